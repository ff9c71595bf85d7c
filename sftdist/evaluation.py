"""`sftdist eval`: a run (its final model, its checkpoints) beside its base, on lm-eval tasks and on the
user's own prompts, in one table.

Built on EleutherAI's lm-evaluation-harness (the `eval` extra) through its Python API and its HF model
wrapper, which gets the model already loaded the way `generate` loads it (a full model, or a LoRA/QLoRA
adapter over its base; a `checkpoint-N` as it is). What lm-eval does not know is how the run rendered its
prompts, so the wrapper's chat hook renders them as training did (`sftdist_prompt.json`, prompt_style.py):
a chat-trained run gets each task prompt as a user turn of its chat template, an instruction run gets it
through its prompt template. Every column (the base too) sees the run's rendering and tokenizer, as in
`generate --compare`. `--prompts-file` answers a data file's prompts with `generate`'s own code and scores
them with sftdist.metrics, the code `generate --compare` reports its accuracy with.

Several processes (`accelerate launch -m sftdist eval ...`, or the ranks of a training run): lm-eval
splits the requests between the ranks and gathers the results on rank 0 through the Accelerator the
wrapper is given, since lm-eval does no distributed setup for a model passed in already loaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from sftdist.errors import UserError
from sftdist.prompt_style import PromptStyle
from sftdist.rundir import ADAPTER_CONFIG, CHECKPOINT_RE, FINAL_DIR

DEMO_TASKS = Path(__file__).resolve().parent / "demo" / "tasks"  # sftdist_demo_gen, sftdist_demo_mc
INSTALL_HINT = "pip install 'sftdist[eval]'"

Scores = dict[str, dict[str, tuple[float, float | None]]]  # task -> metric -> (value, stderr)


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"lm-eval tasks need EleutherAI's lm-evaluation-harness, which is not installed: {INSTALL_HINT}") from None


@dataclass
class TaskSpec:
    """What to evaluate on: lm-eval task names (with extra task folders) and/or a prompts file."""

    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None
    limit: int | None = None
    batch_size: int = 8
    prompts_file: str | None = None
    metric: str = "exact_match"
    max_new_tokens: int = 64


def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """lm-eval's TaskManager that knows every task in `tasks` (the demo tasks and --include-path first; the
    library's own index, a few seconds to build, only when a task is not there); one line for a name
    that is nowhere."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(DEMO_TASKS)]
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise UserError(f"{include_path}: --include-path is not a directory of task YAMLs")
        paths.append(include_path)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(manager.match_tasks([t]) for t in tasks):
        return manager
    manager = TaskManager(include_path=paths)
    for t in tasks:
        if not manager.match_tasks([t]):
            raise UserError(f"unknown lm-eval task '{t}': not one of lm-eval's tasks nor a task YAML under "
                            f"{' or '.join(paths)}")
    return manager


def render_instruction(history: list[dict[str, str]], template: str) -> str:
    """A task's conversation (few-shot turns, an optional system line, the question) through a prompt
    template: each user turn rendered as an instruction, each assistant turn as its response."""
    from sftdist.data.templates import PROMPT_TEMPLATES

    out = []
    for message in history:
        if message["role"] == "system":
            out.append(message["content"].strip() + "\n\n")
        elif message["role"] == "user":
            out.append(PROMPT_TEMPLATES[template].render(message["content"]))
        else:
            out.append(message["content"] + "\n\n")
    return "".join(out)


def make_lm(model: Any, tokenizer: Any, style: PromptStyle, batch_size: int, accelerator: Any = None) -> Any:
    """lm-eval's HF wrapper around a loaded model, rendering prompts as the run trained."""
    from lm_eval.models.huggingface import HFLM

    class RunLM(HFLM):
        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            if style.chat:
                return super().apply_chat_template(chat_history, add_generation_prompt)
            return render_instruction(chat_history, style.template)

    # Chat prompts carry their own BOS if the template writes one, as generate encodes them; instruction
    # prompts get the tokenizer's own BOS, as in training.
    lm = RunLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=False if style.chat else None)
    if accelerator is not None and accelerator.num_processes > 1:
        # lm-eval splits requests over ranks and gathers them through this (it does not for a model passed in)
        lm.accelerator = accelerator
        lm._rank, lm._world_size = accelerator.process_index, accelerator.num_processes
    return lm


def parse_results(results: dict[str, Any]) -> Scores:
    """lm-eval's results ({task: {"metric,filter": v, "metric_stderr,filter": se}}) as task -> metric -> (v, se)."""
    out: Scores = {}
    for task, row in results["results"].items():
        for key, value in row.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            se = row.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric} ({filt})"
            out.setdefault(task, {})[name] = (float(value), float(se) if isinstance(se, (int, float)) else None)
    return out


def run_tasks(
    model: Any, tokenizer: Any, style: PromptStyle, spec: TaskSpec, manager: Any, accelerator: Any = None
) -> Scores | None:
    """The lm-eval tasks of `spec` on one loaded model, split over the processes of `accelerator` (a launch, or
    the ranks of a training run); None on ranks other than 0."""
    from lm_eval.evaluator import evaluate

    # lm-eval's evaluate() rather than simple_evaluate(), which also gathers an environment report (pip,
    # nvidia-smi, git) for every call: seconds per model, and noise, at each save of a training run.
    loaded = manager.load(spec.tasks)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)
    was_training = model.training
    model.eval()
    try:
        results = evaluate(
            lm=make_lm(model, tokenizer, style, spec.batch_size, accelerator),
            task_dict=loaded,
            limit=spec.limit,
            bootstrap_iters=1000,
            apply_chat_template=True,  # the wrapper's hook: the run's rendering, chat or template
            log_samples=False,
            verbosity="ERROR",
        )
    finally:
        model.train(was_training)
    return parse_results(results) if results is not None else None


def run_prompts(model: Any, tokenizer: Any, items: list[Any], spec: TaskSpec) -> Scores:
    """--prompts-file: greedy answers with `generate`'s code, scored by sftdist.metrics (on every rank: the
    prompts are few, and a rank that answered a share would have to gather strings)."""
    from sftdist.generate import answer, token_budget
    from sftdist.metrics import score

    budget = token_budget([model], spec.max_new_tokens)
    predictions = [answer(model, tokenizer, item.ids, budget(i, len(item.ids)), {"do_sample": False})
                   for i, item in enumerate(items, start=1)]
    value = score(spec.metric, predictions, [item.reference for item in items])
    return {Path(spec.prompts_file).name: {spec.metric: value}}


def resolve_targets(path: str, checkpoints: bool) -> list[tuple[str, Path]]:
    """(column, directory) of what MODEL_DIR_OR_RUN names: a model directory itself; a run directory's
    final/ and, with --checkpoints, each kept checkpoint-N (oldest first)."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: no such model or run directory")
    if (p / "config.json").is_file() or (p / ADAPTER_CONFIG).is_file():
        return [(FINAL_DIR if p.name == FINAL_DIR else p.name, p)]
    steps = sorted((int(m.group(1)), c) for c in p.iterdir() if c.is_dir() and (m := CHECKPOINT_RE.match(c.name)))
    out = [(c.name, c) for _, c in steps] if checkpoints else []
    if (p / FINAL_DIR).is_dir():
        out.append((FINAL_DIR, p / FINAL_DIR))
    if not out:
        hint = "" if checkpoints or not steps else " (pass --checkpoints to evaluate its checkpoints)"
        raise UserError(f"{p}: is neither a model directory (config.json or {ADAPTER_CONFIG}) nor a run directory "
                        f"with {FINAL_DIR}/{hint}")
    return out


def _device(accelerator: Any) -> str:
    """This process's GPU under a launch, else the first GPU when there is one, else the CPU."""
    import torch

    if accelerator is not None:
        return str(accelerator.device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def format_table(columns: list[str], scores: dict[str, Scores]) -> str:
    rows = sorted({(task, metric) for s in scores.values() for task, m in s.items() for metric in m})
    header = ["task", "metric", *columns]
    lines = [header]
    for task, metric in rows:
        cells = []
        for col in columns:
            value = scores[col].get(task, {}).get(metric)
            cells.append("-" if value is None else f"{value[0]:.4f}" + ("" if value[1] is None else f" ± {value[1]:.4f}"))
        lines.append([task, metric, *cells])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def run_eval(target: str, base: str | None, checkpoints: bool, spec: TaskSpec, out: str | None) -> dict[str, Any]:
    """Evaluate base (if given), then each target, print the table on rank 0, write --out; return the report."""
    from sftdist import prompt_style
    from sftdist.generate import check_loadable, load_for_generation, read_prompts
    from sftdist.rundir import write_json_atomic

    if not spec.tasks and spec.prompts_file is None:
        raise UserError("nothing to evaluate: pass --tasks T1,T2 and/or --prompts-file FILE")
    if out is not None and not Path(out).resolve().parent.is_dir():
        raise UserError(f"{out}: --out is in a directory that does not exist")
    targets = resolve_targets(target, checkpoints)
    columns = ([("base", Path(base))] if base is not None else []) + targets
    for _, path in columns:  # every refusal before the first model loads
        check_loadable(str(path))
    manager = task_manager(spec.tasks, spec.include_path) if spec.tasks else None
    accelerator = None
    if os.environ.get("WORLD_SIZE", "1") != "1":  # `accelerate launch -m sftdist eval`: one process per GPU
        from accelerate import Accelerator

        accelerator = Accelerator()
    style = prompt_style.read(targets[-1][1])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(targets[-1][1]))  # every column answers the same token ids
    items = read_prompts(spec.prompts_file, [], style, tokenizer) if spec.prompts_file else []
    if spec.prompts_file and not any(item.reference is not None for item in items):
        raise UserError(f"{spec.prompts_file}: has no reference answers to score; use a data file (jsonl, csv, ...) "
                        "with responses")
    items = [item for item in items if item.reference is not None]
    main = accelerator is None or accelerator.is_main_process
    if main:
        click.echo(f"sftdist eval: {style.describe()}", err=True)
    scores: dict[str, Scores] = {}
    for column, path in columns:
        if main:
            click.echo(f"sftdist eval: {column} ({path})", err=True)
        model = load_for_generation(str(path))[0].to(_device(accelerator))
        result: Scores = {}
        if spec.tasks:
            got = run_tasks(model, tokenizer, style, spec, manager, accelerator)
            result.update(got or {})
        if items:
            result.update(run_prompts(model, tokenizer, items, spec))
        scores[column] = result
        del model
    report = {
        "prompt_style": style.describe(),
        "models": {column: str(path) for column, path in columns},
        "processes": 1 if accelerator is None else accelerator.num_processes,  # that lm-eval's requests were split over
        "results": {col: {t: {m: {"value": v, "stderr": se} for m, (v, se) in s.items()} for t, s in sc.items()}
                    for col, sc in scores.items()},
    }
    if main:
        click.echo(format_table([c for c, _ in columns], scores))
        if out is not None:
            write_json_atomic(Path(out), report)
            click.echo(f"sftdist eval: wrote {out}", err=True)
    return report

