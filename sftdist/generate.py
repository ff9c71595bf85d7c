"""`sftdist generate`: answer prompts with a trained model, rendered exactly as in training.

The prompt goes through the same template and Encoder as the training samples, in the rendering the
run recorded (`prompt_style`: saved with every checkpoint, final model and export), so a fine-tuned
model sees what it learnt: a model trained on chat data gets `--prompt` as a user turn of its chat
template, one trained on instruction data gets the run's prompt template. With `--compare BASE` the
base answers the same token ids, side by side; prompts that come with a reference answer (a data
file) are scored by exact match (sftdist.metrics, as `sftdist eval` scores them). Answers stop at the model's context.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from sftdist.errors import UserError
from sftdist.prompt_style import PromptStyle
from sftdist.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS


@dataclass
class Prompt:
    text: str  # what is shown
    ids: list[int]
    reference: str | None = None


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (?P<name>\S+): copying a param with shape torch\.Size\((?P<got>\[[^]]*\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((?P<want>\[[^]]*\])\)"
)


def check_loadable(model_dir: str) -> None:
    """What from_pretrained would fail on with a traceback, as one line: no such model, a config that
    does not parse, no weights or weights cut short; for an adapter, the same for its base."""
    from sftdist.model import check_weights, read_config, require_safetensors

    p = Path(model_dir)
    if not (p / ADAPTER_CONFIG).is_file():
        read_config(model_dir)
        if p.is_dir():
            require_safetensors(model_dir)
            check_weights(p)
        return
    from sftdist import safetensors_io as sio
    from sftdist.merge import read_adapter_config

    base = read_adapter_config(p).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise UserError(f"{p / ADAPTER_CONFIG}: names no base_model_name_or_path, so the adapter has no base to run on")
    require_safetensors(model_dir)
    weights = p / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{p}: has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    sio.tensor_specs(weights)
    try:
        check_loadable(base)
    except UserError as e:
        raise UserError(f"{p / ADAPTER_CONFIG}: base model (base_model_name_or_path): {e}") from None


def placement(cuda: bool, bf16: bool) -> tuple[str, str, str]:
    """(device, dtype, the line that says so) for generation: the first visible GPU, in bf16 where it has bf16
    (fp16 otherwise), else the CPU in fp32 (CPUs have no fast half-precision matmul; an 8B model then needs 32 GB)."""
    if cuda:
        dtype = "bfloat16" if bf16 else "float16"
        return "cuda:0", dtype, f"sftdist generate: on GPU cuda:0 in {dtype}"
    return "cpu", "float32", "sftdist generate: on the CPU in float32 (no GPU visible)"


def load_for_generation(model_dir: str, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """A full model directory, or a LoRA adapter directory on top of its base, on `device` in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftdist.model import require_safetensors

    check_loadable(model_dir)
    p = Path(model_dir)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "device_map": {"": device}}
    if (p / ADAPTER_CONFIG).is_file():
        from peft import AutoPeftModelForCausalLM

        try:
            model = AutoPeftModelForCausalLM.from_pretrained(str(p), **kwargs)
        except RuntimeError as e:  # torch's load_state_dict lists every mismatch; the first says it all
            m = _SIZE_MISMATCH.search(str(e))
            if m is None:
                raise
            raise UserError(
                f"{p / ADAPTER_WEIGHTS}: {m['name']} has shape {m['got']}, but its base model "
                f"({p / ADAPTER_CONFIG} base_model_name_or_path) needs {m['want']}; the adapter was trained on another model"
            ) from None
    else:
        model = AutoModelForCausalLM.from_pretrained(str(p), use_safetensors=require_safetensors(str(p)), **kwargs)
    tok = AutoTokenizer.from_pretrained(str(p))
    model.eval()
    return model, tok


def read_prompts(path: str | None, prompts: list[str], style: PromptStyle, tokenizer: Any) -> list[Prompt]:
    """Prompts from --prompt, a text file (one instruction per line, UTF-8) or a data file with
    references; rows of a data file that are skipped (an empty reference) are counted in a warning."""
    from sftdist.data.encode import Encoder, stop_token_ids
    from sftdist.data.formats import render_rows
    from sftdist.data.load import read_lines, read_source
    from sftdist.data.notices import source_warnings
    from sftdist.data.templates import PROMPT_TEMPLATES
    from sftdist.recipe import SourceConfig

    template = style.template
    enc = Encoder(tokenizer, 10**9, "completion", False, stop_token_ids(tokenizer))
    if style.chat and not tokenizer.chat_template:
        raise UserError(f"{style.source}: the run trained on chat, but the model's tokenizer has no chat template")
    if style.chat:
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
            input_ids=torch.tensor([ids], device=model.device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(stop_token_ids(tokenizer, model.generation_config)),
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def token_budget(models: list[Any], max_new_tokens: int) -> Callable[[int, int], int]:
    """New tokens for prompt i of n tokens: --max-new-tokens, bounded by the smallest context among
    `models` (positions beyond it were never trained, and past them generation only burns time);
    one warning line the first time the bound applies, an error for a prompt that fills the context."""
    from sftdist.model import model_context_length

    contexts = [c for c in (model_context_length(m.config) for m in models) if c is not None]
    context = min(contexts) if contexts else None
    warned = False

    def budget(i: int, prompt_tokens: int) -> int:
        nonlocal warned
        if context is None or prompt_tokens + max_new_tokens <= context:
            return max_new_tokens
        if prompt_tokens >= context:
            raise UserError(f"prompt {i} has {prompt_tokens} tokens, which fills the model's context of {context}")
        if not warned:
            click.echo(
                f"warning: --max-new-tokens {max_new_tokens} goes past the model's context of {context} tokens; "
                "each answer stops at the context",
                err=True,
            )
            warned = True
        return context - prompt_tokens

    return budget


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

    from sftdist import prompt_style
    from sftdist.metrics import exact_match, score

    if not Path(model_dir).is_dir():
        raise UserError(f"{model_dir}: model directory does not exist")
    if base_dir is not None:
        check_loadable(base_dir)
    cuda = torch.cuda.is_available()
    device, dtype, where = placement(cuda, cuda and torch.cuda.is_bf16_supported())
    model, tok = load_for_generation(model_dir, device, dtype)
    style = prompt_style.read(Path(model_dir))
    items = read_prompts(prompts_file, prompts, style, tok)
    if not items:
        raise UserError("no prompts: pass --prompt TEXT or --prompts-file FILE")
    click.echo(f"sftdist generate: {style.describe()}", err=True)
    click.echo(where, err=True)
    # The base answers the same token ids, so both see one rendering; its tokenizer is a subset of ours.
    models = [("fine-tuned", model)]
    if base_dir is not None:
        models.append(("base", load_for_generation(base_dir, device, dtype)[0]))
    new_tokens = token_budget([m for _, m in models], max_new_tokens)
    budgets = [new_tokens(i, len(item.ids)) for i, item in enumerate(items, start=1)]  # refusals before any answer
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p}
    predictions: dict[str, list[str]] = {name: [] for name, _ in models}
    references: list[str] = []
    for i, (item, budget) in enumerate(zip(items, budgets), start=1):
        click.echo(f"--- prompt {i}: {item.text}")
        for name, m in models:
            torch.manual_seed(seed)
            text = answer(m, tok, item.ids, budget, sampling)
            mark = ""
            if item.reference is not None:
                predictions[name].append(text)
                ok = exact_match(text, item.reference)
                mark = " [correct]" if ok else " [wrong]"
            click.echo(f"  {name:>10}: {text}{mark}")
        if item.reference is not None:
            references.append(item.reference)
            click.echo(f"  {'expected':>10}: {item.reference}")
    accuracy = {name: score("exact_match", predictions[name], references)[0] for name in predictions} if references else {}
    for name, acc in accuracy.items():
        click.echo(f"exact-match accuracy ({name}): {acc:.1%} of {len(references)}")
    return accuracy
