"""The recipe's `eval_tasks:`: lm-eval tasks on the model being trained, at its checkpoint saves.

The same evaluation as `sftdist eval` (evaluation.run_tasks: the run's prompt rendering, lm-eval's
requests split over the ranks that trained), on the weights in memory, right after each save (or every
N saves). The scores go through the Trainer's own log, so they sit beside eval_loss in tensorboard and
trainer_state.json as `eval_<task>_<metric>` (and `..._stderr`, and its wall time as `eval_tasks_seconds`), and `sftdist_run.json` lists them per
step. It never blocks a resume: it runs after the checkpoint is complete (a failure or a stop during it
leaves that checkpoint whole), and `eval_tasks` is not part of the run's identity (recipe.run_identity),
so adding, changing or removing it resumes the same run.

Not under FSDP or DeepSpeed ZeRO-3: their parameters are sharded, and generation would need every rank to
run the same number of forward passes; those runs are evaluated afterwards with `sftdist eval --checkpoints`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from transformers import TrainerCallback

from sftdist.recipe import Recipe

SECONDS = "eval_tasks_seconds"  # wall time of one evaluation, logged with its scores


def _sharded(trainer: Any) -> bool:
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


class EvalTasksCallback(TrainerCallback):
    def __init__(self, trainer: Any, recipe: Recipe, manager: Any) -> None:
        from sftdist.evaluation import TaskSpec

        cfg = recipe.eval_tasks
        self.trainer, self.output_dir, self.manager = trainer, Path(recipe.output_dir), manager
        self.spec = TaskSpec(list(cfg.tasks), cfg.include_path, cfg.limit, cfg.batch_size)
        self.every = cfg.every_n_saves
        self.saves = 0

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from sftdist import prompt_style
        from sftdist.evaluation import run_tasks

        self.saves += 1
        if self.saves % self.every:
            return
        style = prompt_style.read(self.output_dir)  # recorded by the run once it claimed output_dir
        start = time.perf_counter()
        trainer = self.trainer
        scores = run_tasks(trainer.model, trainer.processing_class, style, self.spec, self.manager, trainer.accelerator)
        if scores is None:  # a rank other than 0: lm-eval gathered its share there
            return
        logs: dict[str, float] = {SECONDS: time.perf_counter() - start}  # what it cost, beside the scores
        for task, metrics in scores.items():
            for metric, (value, stderr) in metrics.items():
                logs[f"eval_{task}_{metric}"] = value
                if stderr is not None:
                    logs[f"eval_{task}_{metric}_stderr"] = stderr
        self.trainer.log(logs)


def install(trainer: Any, recipe: Recipe) -> None:
    """Add the callback when the recipe has `eval_tasks:`; lm-eval missing or a task name it does not know
    is refused here, before the run touches output_dir."""
    if not recipe.eval_tasks.tasks:
        return
    from sftdist.evaluation import task_manager

    manager = task_manager(list(recipe.eval_tasks.tasks), recipe.eval_tasks.include_path)
    if _sharded(trainer):
        if trainer.is_world_process_zero():
            click.echo("warning: eval_tasks is skipped under FSDP / DeepSpeed ZeRO-3 (sharded parameters); evaluate "
                       "the checkpoints afterwards with `sftdist eval OUTPUT_DIR --checkpoints`", err=True)
        return
    trainer.add_callback(EvalTasksCallback(trainer, recipe, manager))


def history(trainer: Any, recipe: Recipe) -> dict[str, Any]:
    """For sftdist_run.json: {"eval_tasks": [{"step": N, "eval_<task>_<metric>": v, ...}, ...]} from the
    Trainer's log (which a resumed run carries on), or nothing when the recipe has no eval_tasks."""
    if not recipe.eval_tasks.tasks:
        return {}
    keys = (SECONDS, *(f"eval_{task}_" for task in recipe.eval_tasks.tasks))
    rows = []
    for entry in trainer.state.log_history:
        scores = {k: v for k, v in entry.items() if k.startswith(keys)}
        if scores:
            rows.append({"step": entry.get("step"), **scores})
    return {"eval_tasks": rows}
