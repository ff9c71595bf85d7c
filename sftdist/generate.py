"""`sftdist generate`: answer prompts with a trained model, rendered exactly as in training.

The prompt goes through the same template and Encoder as the training samples (read from the
`sftdist_recipe.yaml` saved beside the model), so a fine-tuned model sees what it learnt: a model
trained on chat data gets `--prompt` as a user turn of its chat template, one trained on
instruction data gets the recipe's prompt template. With
`--compare BASE` the base answers the same token ids, side by side; prompts that come with a
reference answer (a data file) are scored by exact match.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from sftdist.errors import UserError
from sftdist.recipe import Recipe, recipe_from_dict
from sftdist.rundir import RECIPE_FILE


@dataclass
class Prompt:
    text: str  # what is shown
    ids: list[int]
    reference: str | None = None


def _trained_recipe(model_dir: Path) -> Recipe | None:
    f = model_dir / RECIPE_FILE
    if not f.is_file():
        return None
    return recipe_from_dict(yaml.safe_load(f.read_text(encoding="utf-8")), source=str(f))


def trained_on_chat(recipe: Recipe | None) -> bool:
    """Whether the run trained on chat rows only: each source's format, detected from its first row
    when `auto` (sources no longer readable are skipped; mixed runs keep the prompt template)."""
    from sftdist.data.formats import CHAT_FORMATS, SELECT_FORMATS, render_rows
    from sftdist.data.load import read_source

    if recipe is None:
        return False
    formats = []
    for src in recipe.data.train:
        fmt = src.format
        if fmt == "auto" or fmt in SELECT_FORMATS:
            try:
                rows = read_source(dataclasses.replace(src, limit=1))
                fmt = render_rows(rows.rows, rows.labels, src.format, recipe.data.template, rows.where).format
            except UserError:
                continue
        formats.append(fmt)
    return bool(formats) and all(f in CHAT_FORMATS for f in formats)


def load_for_generation(model_dir: str) -> tuple[Any, Any]:
    """A full model directory, or a LoRA adapter directory on top of its base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftdist.model import check_model_path, require_safetensors

    p = Path(model_dir)
    if (p / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        require_safetensors(str(p))
        model = AutoPeftModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    else:
        check_model_path(model_dir)
        model = AutoModelForCausalLM.from_pretrained(
            str(p), dtype=torch.float32, use_safetensors=require_safetensors(str(p))
        )
    tok = AutoTokenizer.from_pretrained(str(p))
    model.eval()
    return model, tok


def read_prompts(path: str | None, prompts: list[str], recipe: Recipe | None, tokenizer: Any) -> list[Prompt]:
    """Prompts from --prompt, a text file (one instruction per line, UTF-8) or a data file with
    references; rows of a data file that are skipped (an empty reference) are counted in a warning."""
    from sftdist.data.encode import Encoder, stop_token_ids
    from sftdist.data.formats import render_rows
    from sftdist.data.load import read_lines, read_source
    from sftdist.data.notices import source_warnings
    from sftdist.data.templates import PROMPT_TEMPLATES
    from sftdist.recipe import SourceConfig

    template = recipe.data.template if recipe else "default"
    enc = Encoder(tokenizer, 10**9, "completion", False, stop_token_ids(tokenizer))
    if trained_on_chat(recipe) and tokenizer.chat_template:
        def render(text: str) -> list[int]:
            return enc.chat_prompt_ids([{"role": "user", "content": text}])
    else:
        def render(text: str) -> list[int]:
            return enc.prompt_ids(PROMPT_TEMPLATES[template].render(text))

    out = [Prompt(t, render(t)) for t in prompts]
    if path is None:
        return out
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: prompts file does not exist")
    if p.suffix not in (".jsonl", ".json", ".parquet", ".csv"):
        for _, line in read_lines(p):
            if line.strip():
                out.append(Prompt(line.strip(), render(line.strip())))
        return out
    rows = read_source(SourceConfig(path=str(p)))
    rendered = render_rows(rows.rows, rows.labels, "auto", template, rows.where)
    notes = (rendered.dropped, rendered.changed, rendered.ignored_columns, rendered.ignored_keys)
    for line in source_warnings(rows.where, len(rows.rows), *notes):
        click.echo(line, err=True)
    for ex in rendered.examples:
        if ex.kind == "chat":
            history, last = ex.messages[:-1], ex.messages[-1]["content"]
            out.append(Prompt(history[-1]["content"], enc.chat_prompt_ids(history), last))
        elif ex.kind == "instruction":
            out.append(Prompt(ex.prompt.strip(), enc.prompt_ids(ex.prompt), ex.completion))
        else:
            raise UserError(f"{p}: format 'text' has no prompt to answer; use an instruction or chat format")
    return out


def answer(model: Any, tokenizer: Any, ids: list[int], max_new_tokens: int, sampling: dict[str, Any]) -> str:
    import torch

    from sftdist.data.encode import stop_token_ids

    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(stop_token_ids(tokenizer, model.generation_config)),
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def run_generate(
    model_dir: str,
    base_dir: str | None,
    prompts_file: str | None,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    greedy: bool,
    seed: int,
) -> dict[str, float]:
    """Print answers (and base answers, and exact-match accuracy); return the accuracies."""
    import torch

    from sftdist.demo import exact_match

    if not Path(model_dir).is_dir():
        raise UserError(f"{model_dir}: model directory does not exist")
    model, tok = load_for_generation(model_dir)
    items = read_prompts(prompts_file, prompts, _trained_recipe(Path(model_dir)), tok)
    if not items:
        raise UserError("no prompts: pass --prompt TEXT or --prompts-file FILE")
    # The base answers the same token ids, so both see one rendering; its tokenizer is a subset of ours.
    models = [("fine-tuned", model)]
    if base_dir is not None:
        models.append(("base", load_for_generation(base_dir)[0]))
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p}
    correct = {name: 0 for name, _ in models}
    scored = 0
    for i, item in enumerate(items, start=1):
        click.echo(f"--- prompt {i}: {item.text}")
        for name, m in models:
            torch.manual_seed(seed)
            text = answer(m, tok, item.ids, max_new_tokens, sampling)
            mark = ""
            if item.reference is not None:
                ok = exact_match(text, item.reference)
                correct[name] += ok
                mark = " [correct]" if ok else " [wrong]"
            click.echo(f"  {name:>10}: {text}{mark}")
        if item.reference is not None:
            scored += 1
            click.echo(f"  {'expected':>10}: {item.reference}")
    accuracy = {name: correct[name] / scored for name in correct} if scored else {}
    for name, acc in accuracy.items():
        click.echo(f"exact-match accuracy ({name}): {acc:.1%} of {scored}")
    return accuracy
