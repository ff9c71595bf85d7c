"""The `sftdist` command line.

Each command imports torch/transformers inside its body, so `sftdist --help` answers instantly.
`main()` turns a `UserError` into one line on stderr and exit code 2; other exceptions are bugs and
keep their traceback.
"""

from __future__ import annotations

import sys

import click

from sftdist.errors import EXIT_USER_ERROR, UserError
from sftdist.strategies import STRATEGIES

SET_HELP = "Override a recipe key, e.g. --set train.max_steps=50 (repeatable)."
PORT = click.IntRange(1, 65535)
COUNT = click.IntRange(min=1)


def shard_size(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Check a --max-shard-size before any work starts (it is otherwise read at the first write)."""
    if value is not None:
        from sftdist.preflight import check_shard_size

        check_shard_size(value, param.opts[0])
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.version_option(package_name="sftdist")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Supervised fine-tuning of causal language models (full, LoRA, QLoRA) from a YAML recipe."""
    if ctx.invoked_subcommand is None:  # a bare `sftdist`: its usage, not an error (as git and accelerate do)
        click.echo(ctx.get_help())
        return
    from sftdist.quiet import silence_libraries

    silence_libraries()  # before any command imports them; SFTDIST_VERBOSE=1 shows their output


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--no-resume", is_flag=True, help="Start over even if output_dir holds a checkpoint of this recipe.")
@click.option("--overwrite", is_flag=True, help="Replace another run's output_dir instead of refusing.")
def train(recipe: str, overrides: tuple[str, ...], no_resume: bool, overwrite: bool) -> None:
    """Train RECIPE in this process (run it under `sftdist launch` or `accelerate launch` for several)."""
    from sftdist import preemption

    preemption.install()  # first: a preemption during the imports and loading below must still stop cleanly
    import os

    from sftdist.launcher import build_launch, one_process_choice, run_launch, visible_gpus
    from sftdist.recipe import load_recipe
    from sftdist.train import run_training

    gpus = visible_gpus()
    choice = one_process_choice(gpus, os.environ, None)
    if choice.action == "relaunch":  # the trainer would wrap every GPU in nn.DataParallel, which trl refuses
        flags = [f for f, on in (("--no-resume", no_resume), ("--overwrite", overwrite)) if on]
        launch = build_launch(recipe, "auto", overrides=overrides, train_flags=flags, gpus=gpus)
        click.echo(f"sftdist train: {choice.note} ({launch.note})", err=True)
        if code := run_launch(launch):
            raise SystemExit(code)
        return
    run_training(load_recipe(recipe, overrides), resume=not no_resume, overwrite=overwrite)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--strategy",
    required=True,
    metavar="NAME",
    help="single, ddp, fsdp2, zero1, zero2, zero3, zero3-offload, auto (the fastest that `sftdist plan` says "
    "fits), or the path of your own accelerate config.",
)
@click.option("--num-processes", type=COUNT, help="Processes per machine [default: visible GPUs; required on CPU].")
@click.option("--num-machines", type=COUNT, default=1, show_default=True, help="Machines in the run (each runs this command).")
@click.option("--machine-rank", type=click.IntRange(min=0), default=0, show_default=True, help="This machine's rank (0 hosts the group).")
@click.option("--main-process-ip", help="Address of the rank-0 machine (needed with --num-machines > 1).")
@click.option("--main-process-port", type=PORT, help="Port on the rank-0 machine [default: 29500].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--no-resume", is_flag=True, help="Passed to `sftdist train`.")
@click.option("--overwrite", is_flag=True, help="Passed to `sftdist train`.")
@click.option("--dry-run", is_flag=True, help="Print the exact command and environment; start nothing.")
@click.option(
    "--gpu-memory",
    help="--strategy auto: memory per GPU to plan with [default: the visible GPUs'; on CPU: RAM / processes].",
)
@click.argument("accelerate_args", nargs=-1, type=click.UNPROCESSED)
def launch(
    recipe: str,
    strategy: str,
    num_processes: int | None,
    num_machines: int,
    machine_rank: int,
    main_process_ip: str | None,
    main_process_port: int | None,
    overrides: tuple[str, ...],
    no_resume: bool,
    overwrite: bool,
    dry_run: bool,
    gpu_memory: str | None,
    accelerate_args: tuple[str, ...],
) -> None:
    """Train RECIPE on one or more processes/machines with a strategy; args after `--` go to `accelerate launch`."""
    from sftdist.launcher import build_launch, run_launch
    from sftdist.units import parse_size

    gpu_bytes = None
    if gpu_memory is not None:
        if strategy != "auto":
            raise UserError(f"--gpu-memory is only used with --strategy auto, not --strategy {strategy}")
        gpu_bytes = parse_size(gpu_memory, "--gpu-memory")
    launch = build_launch(
        recipe,
        strategy,
        num_processes=num_processes,
        num_machines=num_machines,
        machine_rank=machine_rank,
        main_process_ip=main_process_ip,
        main_process_port=main_process_port,
        overrides=overrides,
        train_flags=[f for f, on in (("--no-resume", no_resume), ("--overwrite", overwrite)) if on],
        accelerate_args=accelerate_args,
        gpu_memory=gpu_bytes,
    )
    if launch.note:
        click.echo(f"sftdist launch: {launch.note}", err=True)
    if dry_run:
        click.echo(launch.render())
        return
    code = run_launch(launch)
    if code:
        raise SystemExit(code)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--check", is_flag=True, help="Run every data and settings check without loading model weights (builds the "
              "data cache entry when missing); print nothing else.")
@click.option("--show", type=click.IntRange(min=1), metavar="N", help="Print N rendered samples per source, loss tokens marked.")
def data(recipe: str, overrides: tuple[str, ...], check: bool, show: int | None) -> None:
    """Report formats, kept/dropped rows, token lengths and packing efficiency for RECIPE's data."""
    from sftdist.data.report import check_data, report_data
    from sftdist.recipe import load_recipe

    r = load_recipe(recipe, overrides)
    if show:
        from sftdist.data.show import show_data

        show_data(r, show)
    elif check:
        from sftdist.preflight import check_recipe

        check_recipe(r)  # the settings `train` checks before writing (config.json only, no weights)
        check_data(r)
    else:
        report_data(r)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--force", is_flag=True, help="Rebuild the cache entry even if a complete one exists.")
def prepare(recipe: str, overrides: tuple[str, ...], force: bool) -> None:
    """Tokenize and pack RECIPE's data once into the cache that `train` (every rank) memory-maps."""
    from sftdist.data.report import report_data
    from sftdist.recipe import load_recipe

    report_data(load_recipe(recipe, overrides), force=force)


@cli.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--compare", "base_dir", type=click.Path(file_okay=False), help="Also answer with this base model.")
@click.option("--prompts-file", type=click.Path(dir_okay=False), help="One prompt per line, or a jsonl data file.")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable).")
@click.option("--max-new-tokens", type=COUNT, default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.7, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True)
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


@cli.group(invoke_without_command=True)
@click.pass_context
def recipes(ctx: click.Context) -> None:
    """List the recipes shipped with sftdist; `sftdist recipes copy NAME DEST` copies one to edit."""
    if ctx.invoked_subcommand is None:
        from sftdist.shipped_recipes import shipped, summary

        for name, path in shipped().items():
            click.echo(f"{name:28} {summary(path)}")


@recipes.command("copy")
@click.argument("name")
@click.argument("dest", type=click.Path())
def recipes_copy(name: str, dest: str) -> None:
    """Copy the shipped recipe NAME to DEST (a new file, or a directory for NAME.yaml)."""
    from sftdist.shipped_recipes import copy

    click.echo(f"wrote {copy(name, dest)}")


@cli.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--num-processes", type=COUNT, help="For the auto strategy: processes per machine [default: visible GPUs].")
@click.option("--num-machines", type=COUNT, default=1, show_default=True, help="For the auto strategy: machines.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def env(recipe: str | None, num_processes: int | None, num_machines: int, overrides: tuple[str, ...]) -> None:
    """Print versions, CUDA, the GPUs and (given RECIPE) what `launch --strategy auto` would choose: for bug reports."""
    from sftdist.envinfo import report

    click.echo("\n".join(report(recipe, overrides, num_processes, num_machines)))


@cli.command("eval")
@click.argument("model_dir_or_run", type=click.Path(file_okay=False))
@click.option("--compare", "base_dir", type=click.Path(file_okay=False), help="Also evaluate this base model.")
@click.option("--tasks", default="", metavar="T1,T2", help="lm-eval tasks (names or globs); the demo's are sftdist_demo_gen, sftdist_demo_mc.")
@click.option("--include-path", type=click.Path(file_okay=False), help="A folder of your own lm-eval task YAMLs.")
@click.option("--limit", type=COUNT, help="Evaluate at most N documents per task.")
@click.option("--checkpoints", is_flag=True, help="For a run directory: also every kept checkpoint-N.")
@click.option("--prompts-file", type=click.Path(dir_okay=False), help="A data file of prompts with reference answers (the formats generate reads).")
@click.option("--metric", type=click.Choice(["exact_match", "rouge", "bleu", "chrf"]), default="exact_match", show_default=True, help="How --prompts-file answers are scored.")
@click.option("--max-new-tokens", type=COUNT, default=64, show_default=True, help="For --prompts-file answers.")
@click.option("--batch-size", type=COUNT, default=8, show_default=True, help="lm-eval requests per forward pass.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON here.")
def eval_cmd(model_dir_or_run: str, base_dir: str | None, tasks: str, include_path: str | None, limit: int | None,
             checkpoints: bool, prompts_file: str | None, metric: str, max_new_tokens: int, batch_size: int,
             out: str | None) -> None:
    """Evaluate a model or a run (final/, --checkpoints) beside its base on lm-eval tasks and your prompts."""
    from sftdist.evaluation import TaskSpec, run_eval

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    spec = TaskSpec(names, include_path, limit, batch_size, prompts_file, metric, max_new_tokens)
    run_eval(model_dir_or_run, base_dir, checkpoints, spec, out)


@cli.command("make-tiny-model")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
def make_tiny_model_cmd(out_dir: str, seed: int) -> None:
    """Write the embedded default: a small Llama with a locally trained BPE tokenizer."""
    from sftdist.tiny import make_tiny_model

    make_tiny_model(out_dir, seed=seed)
    click.echo(f"wrote {out_dir}")


@cli.command("merge-adapter")
@click.option("--base", required=True, metavar="DIR", help="The base model directory the adapter was trained on.")
@click.option("--adapter", required=True, metavar="DIR", help="The peft LoRA adapter directory (e.g. a run's final/).")
@click.option("--out", required=True, metavar="DIR", help="New directory for the merged model (absent or empty).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), help="Output dtype [default: the base's].")
@click.option("--max-shard-size", metavar="SIZE", callback=shard_size, help="Re-shard the output, e.g. 2GB [default: one output shard per base shard].")
@click.option("--device", default="cpu", show_default=True, help="Where the merge arithmetic runs.")
@click.option("--no-verify", is_flag=True, help="Skip comparing logits with base + adapter (loads the whole model).")
@click.option(
    "--quantized-base",
    type=click.Choice(["nf4", "fp4", "none"]),
    help="The 4-bit type the adapter was trained against [default: from the run's sftdist_recipe.yaml].",
)
@click.option(
    "--merge-into",
    type=click.Choice(["quantized", "original"]),
    help="QLoRA: merge into the dequantized 4-bit weights the adapter saw, or the original ones [default: quantized].",
)
@click.option("--allow-pickle", is_flag=True, help="Accept .bin (pickle) weights, which can run code when loaded.")
def merge_adapter_cmd(
    base: str,
    adapter: str,
    out: str,
    dtype: str | None,
    max_shard_size: str | None,
    device: str,
    no_verify: bool,
    quantized_base: str | None,
    merge_into: str | None,
    allow_pickle: bool,
) -> None:
    """Merge a LoRA/QLoRA adapter into its base, one shard at a time, verify it, and write a model card."""
    from sftdist.merge import merge_adapter

    result = merge_adapter(
        base,
        adapter,
        out,
        dtype=dtype,
        max_shard_size=max_shard_size,
        device=device,
        verify=not no_verify,
        quantized_base=quantized_base,
        merge_into=merge_into,
        allow_pickle=allow_pickle,
    )
    click.echo(f"wrote {result.out} ({len(result.files)} weight file(s), {result.dtype})")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--num-processes", "gpus", type=COUNT, help="GPUs (processes) per machine, as for `launch`.  [required]")
@click.option("--gpu-memory", required=True, help="Memory of one GPU, e.g. 80GiB, 24GB, 81920MiB.")
@click.option("--num-machines", "nodes", type=COUNT, help="Machines (GPUs in all: processes x machines).  [default: 1]")
@click.option("--gpus", "old_gpus", type=COUNT, hidden=True)  # the names before `launch`'s were shared
@click.option("--nodes", "old_nodes", type=COUNT, hidden=True)
@click.option("--cpu-memory", help="CPU RAM per node, e.g. 1TiB; zero3-offload is only recommended when given.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def plan(
    recipe: str, gpus: int | None, gpu_memory: str, nodes: int | None, old_gpus: int | None, old_nodes: int | None,
    cpu_memory: str | None, overrides: tuple[str, ...],
) -> None:
    """Estimate memory per GPU for every strategy and recommend the fastest that fits (reads config.json only)."""
    from sftdist.plan import format_plan, make_plan, no_fit_error
    from sftdist.recipe import load_recipe
    from sftdist.units import parse_size

    gpus = gpus or old_gpus
    nodes = nodes or old_nodes or 1
    if gpus is None:
        raise UserError("sftdist plan: missing --num-processes N (GPUs per machine)")

    gpu_bytes = parse_size(gpu_memory, "--gpu-memory")
    cpu_bytes = parse_size(cpu_memory, "--cpu-memory") if cpu_memory else None
    result = make_plan(load_recipe(recipe, overrides), gpus, gpu_bytes, nodes, cpu_bytes)
    click.echo(format_plan(result))
    if result.recommended is None:
        raise no_fit_error(result)


@cli.command()
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New directory for the model.")
@click.option("--merge", is_flag=True, help="For a LoRA/QLoRA checkpoint: merge the adapter into its base.")
@click.option("--max-shard-size", default="5GB", show_default=True, callback=shard_size, help="Largest safetensors shard.")
def export(checkpoint: str, out: str, merge: bool, max_shard_size: str) -> None:
    """Turn any checkpoint (single, DDP, ZeRO, FSDP2, LoRA) into a Hugging Face model directory."""
    from sftdist.export import export_checkpoint

    click.echo(f"wrote {export_checkpoint(checkpoint, out, merge=merge, max_shard_size=max_shard_size)}")


@cli.command()
@click.option("--size", metavar="tiny|125m|1b|8b|PATH/config.json",
              help="Model shape (Llama layout, random weights) [default: tiny on CPU, 1b on a GPU].")
@click.option("--method", type=click.Choice(["full", "lora", "qlora"]), default="full", show_default=True)
@click.option("--steps", type=click.IntRange(min=2), default=20, show_default=True,
              help="Optimizer steps; the first few are warm-up and left out of tokens/s.")
@click.option("--max-length", type=click.IntRange(min=8), help="Tokens per packed row [default: 128 for tiny, 4096 for 1b and 8b].")
@click.option("--batch", type=COUNT, help="Packed rows per device per step [default: 8 for tiny, 4 for 1b, 2 for 8b].")
@click.option("--strategy", type=click.Choice(list(STRATEGIES)), default="single", show_default=True,
              help="Run one process per GPU under `accelerate launch` with this strategy, as `sftdist launch` does.")
@click.option("--num-processes", type=COUNT, help="With --strategy: processes [default: every visible GPU; required on CPU].")
@click.option("--baseline", is_flag=True, help="Also train with trl's plain SFTTrainer on the same samples and model.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the JSON report to this file.")
@click.option("--peak-tflops", type=click.FloatRange(min=0, min_open=True),
              help="Dense bf16 peak of one device in TFLOP/s, for the MFU [default: sftdist's table of GPUs].")
@click.option("--work", type=click.Path(file_okay=False),
              help="Keep the random models and runs here, reused by the next selftest [default: a temporary folder].")
@click.option("--worker", hidden=True, type=click.Path(dir_okay=False))  # one launched process of a selftest
def selftest(
    size: str | None,
    method: str,
    steps: int,
    max_length: int | None,
    batch: int | None,
    strategy: str,
    num_processes: int | None,
    baseline: bool,
    out: str | None,
    peak_tflops: float | None,
    work: str | None,
    worker: str | None,
) -> None:
    """Train a random model of a published shape on the bundled data with sftdist's own trainer, and report
    tokens/s, MFU, peak memory against `sftdist plan`, what ran, and the packing check."""
    if worker:
        import json
        from pathlib import Path

        from sftdist.selftest_rank import run

        run(json.loads(Path(worker).read_text(encoding="utf-8")))
        return
    from sftdist.selftest import Options, main

    main(Options(size=size, method=method, steps=steps, max_length=max_length, batch=batch, strategy=strategy,
                 num_processes=num_processes, baseline=baseline, out=out, peak_tflops=peak_tflops, work=work))


def main() -> None:
    """Entry point: one line and exit code 2 for user mistakes."""
    try:
        cli(standalone_mode=False)
    except UserError as e:
        if not e.shown_elsewhere:
            click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # one line, like ours (click's own adds usage and a help hint)
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
