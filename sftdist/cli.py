"""The `sftdist` command line.

Each command imports torch/transformers inside its body, so `sftdist --help` answers instantly.
`main()` turns a `UserError` into one line on stderr and exit code 2; other exceptions are bugs and
keep their traceback.
"""

from __future__ import annotations

import sys

import click

from sftdist.errors import EXIT_USER_ERROR, UserError

SET_HELP = "Override a recipe key, e.g. --set train.max_steps=50 (repeatable)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sftdist")
def cli() -> None:
    """Supervised fine-tuning of causal language models (full, LoRA, QLoRA) from a YAML recipe."""


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--no-resume", is_flag=True, help="Start over even if output_dir holds a checkpoint of this recipe.")
@click.option("--overwrite", is_flag=True, help="Replace another run's output_dir instead of refusing.")
def train(recipe: str, overrides: tuple[str, ...], no_resume: bool, overwrite: bool) -> None:
    """Train RECIPE in this process (run it under `sftdist launch` or `accelerate launch` for several)."""
    from sftdist.recipe import load_recipe
    from sftdist.train import run_training

    run_training(load_recipe(recipe, overrides), resume=not no_resume, overwrite=overwrite)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--check", is_flag=True, help="Run every data check without loading the model; print nothing else.")
def data(recipe: str, overrides: tuple[str, ...], check: bool) -> None:
    """Report formats, kept/dropped rows, token lengths and packing efficiency for RECIPE's data."""
    from sftdist.data.inspect import check_data, report_data
    from sftdist.recipe import load_recipe

    r = load_recipe(recipe, overrides)
    if check:
        check_data(r)
    else:
        report_data(r)


@cli.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--compare", "base_dir", type=click.Path(file_okay=False), help="Also answer with this base model.")
@click.option("--prompts-file", type=click.Path(dir_okay=False), help="One prompt per line, or a jsonl data file.")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable).")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.7, show_default=True)
@click.option("--top-p", default=0.9, show_default=True)
@click.option("--greedy", is_flag=True, help="Greedy decoding (ignores temperature/top-p).")
@click.option("--seed", default=0, show_default=True)
def generate(
    model_dir: str,
    base_dir: str | None,
    prompts_file: str | None,
    prompts: tuple[str, ...],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    greedy: bool,
    seed: int,
) -> None:
    """Answer prompts with a trained model (or base + adapter), rendered as in training."""
    from sftdist.generate import run_generate

    run_generate(
        model_dir,
        base_dir=base_dir,
        prompts_file=prompts_file,
        prompts=list(prompts),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        greedy=greedy,
        seed=seed,
    )


@cli.command("make-tiny-model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
def make_tiny_model_cmd(out_dir: str, seed: int) -> None:
    """Write the embedded default: a small Llama with a locally trained BPE tokenizer."""
    from sftdist.tiny import make_tiny_model

    make_tiny_model(out_dir, seed=seed)
    click.echo(f"wrote {out_dir}")


def main() -> None:
    """Entry point: one line and exit code 2 for user mistakes."""
    try:
        cli(standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(EXIT_USER_ERROR)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
