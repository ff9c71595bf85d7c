"""Output directory ownership, atomic checkpoints, resume, preemption and the final save.

Gaps filled: transformers writes `checkpoint-N` in place and rotates old ones before the new one
is known to be whole, so a kill mid-write leaves a directory that `resume_from_checkpoint=True`
picks up. Here a checkpoint counts only once every rank has finished it and rank 0 has written
`COMPLETE_MARKER` into it; rotation runs after that. SIGTERM/SIGUSR1/SIGINT (slurm preemption,
Ctrl-C) make the run save at the next step boundary and exit with `EXIT_PREEMPTED`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import yaml

from sftdist.errors import UserError
from sftdist.recipe import RECIPE_FILE, Recipe

COMPLETE_MARKER = "sftdist_complete"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after saving; run again to resume
FSDP_SHARDS = "pytorch_model_fsdp_0"  # accelerate's folder of FSDP SHARDED_STATE_DICT model shards
WEIGHT_PATTERNS = ("model*.safetensors", "adapter_model.safetensors", FSDP_SHARDS, "*.distcp")


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints that resume may use, oldest first (incomplete ones are invisible)."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / COMPLETE_MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def _decide(recipe: Recipe, resume: bool, overwrite: bool) -> tuple[str, Path | None]:
    """What to do with output_dir: ('fresh'|'resume'|'restart'|'replace', checkpoint to resume)."""
    out = Path(recipe.output_dir)
    if not out.exists() or not any(out.iterdir()):
        return "fresh", None
    if not out.is_dir():
        raise UserError(f"{out}: output_dir exists and is not a directory")
    saved = out / RECIPE_FILE
    try:
        same = saved.is_file() and yaml.safe_load(saved.read_text(encoding="utf-8")) == recipe.to_dict()
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError(f"{saved}: is not a valid recipe file; pass --overwrite to replace this output_dir") from None
    if overwrite:
        return "replace", None
    if not same:
        what = "another recipe's run" if saved.is_file() else "files that are not an sftdist run"
        raise UserError(
            f"{out}: output_dir holds {what}; choose another output_dir, or pass --overwrite to replace it"
        )
    if not resume:
        return "restart", None
    ckpts = complete_checkpoints(out)
    return ("resume", ckpts[-1]) if ckpts else ("restart", None)


def prepare_output_dir(recipe: Recipe, args: Any, resume: bool, overwrite: bool) -> str | None:
    """Claim output_dir for this recipe; return the checkpoint to resume from, if any.

    Rank 0 decides and writes first (`main_process_first`); the other ranks then see the same state.
    """
    out = Path(recipe.output_dir)
    with args.main_process_first(local=False, desc="output_dir"):
        action, ckpt = _decide(recipe, resume, overwrite)
        if args.process_index == 0:
            if action == "replace":
                shutil.rmtree(out)
            elif action == "restart":
                for p in out.iterdir():
                    if CHECKPOINT_RE.match(p.name) or p.name.startswith("final"):
                        shutil.rmtree(p)
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / RECIPE_FILE, recipe_yaml(recipe))
    if ckpt is not None and args.process_index == 0:
        print(f"sftdist: resuming from {ckpt}", flush=True)
    return str(ckpt) if ckpt is not None else None


class _StopOnSignal:
    """Turns a preemption signal into 'save at the next step boundary, then stop'."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once


def make_trainer_class(base: type, max_shard_size: str) -> type:
    """SFTTrainer with atomic, sharded checkpoints and signal-triggered saves."""
    from transformers import PreTrainedModel, TrainerCallback

    stop = _StopOnSignal()

    class SignalCallback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if _any_rank(stop.requested):
                control.should_save = True
                control.should_training_stop = True
                state.sftdist_preempted = True
            return control

    class SftdistTrainer(base):
        preempted = property(lambda self: getattr(self.state, "sftdist_preempted", False))

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, callbacks=[SignalCallback()], **kw)

        def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
            # The Trainer has no shard-size setting; save_pretrained's default is one 50GB file.
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            if isinstance(model, PreTrainedModel):
                model.save_pretrained = functools.partial(model.save_pretrained, max_shard_size=max_shard_size)
            try:
                super()._save(output_dir, state_dict)
            finally:
                model.__dict__.pop("save_pretrained", None)

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            super().save_model(output_dir, _internal_call)
            if _fsdp_sharded(self) and self.args.should_save:
                _write_model_description(self, Path(output_dir or self.args.output_dir))

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            limit = self.args.save_total_limit
            self.args.save_total_limit = None  # rotate only once the new checkpoint is complete
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                run_dir = Path(self.args.output_dir)
                ckpt = run_dir / f"checkpoint-{self.state.global_step}"
                write_json_atomic(ckpt / COMPLETE_MARKER, {"global_step": self.state.global_step})
                _rotate(run_dir, limit)
            self.accelerator.wait_for_everyone()

    return SftdistTrainer


def _fsdp_sharded(trainer: Any) -> bool:
    return getattr(trainer, "is_fsdp_enabled", False) and "SHARDED" in str(
        trainer.accelerator.state.fsdp_plugin.state_dict_type
    )


def _write_model_description(trainer: Any, output_dir: Path) -> None:
    """Gap: under FSDP `SHARDED_STATE_DICT` the Trainer's checkpoint holds only the DCP shards, no
    config or tokenizer, so nothing (sftdist export, a user) can rebuild a model from it. Write what
    `save_pretrained` would have written beside the weights: the model's config and generation
    config, or the adapter's config for a LoRA run (whose shards hold the adapter only), and the tokenizer."""
    import copy

    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    output_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        config = copy.deepcopy(model.peft_config[model.active_adapter])
        config.inference_mode = True  # as PeftModel.save_pretrained writes it
        config.save_pretrained(str(output_dir))
    else:
        model.config.save_pretrained(output_dir)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(output_dir)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(output_dir)


def _any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a signal may reach only some ranks)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _rotate(run_dir: Path, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints; drop incomplete leftovers older than them."""
    complete = complete_checkpoints(run_dir)
    if limit is not None and limit > 0:
        for p in complete[:-limit]:
            shutil.rmtree(p, ignore_errors=True)
    newest = int(CHECKPOINT_RE.match(complete[-1].name).group(1)) if complete else None
    for p in run_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and newest is not None and int(m.group(1)) < newest and not (p / COMPLETE_MARKER).exists():
            shutil.rmtree(p, ignore_errors=True)


def has_weights(directory: Path) -> bool:
    return any(any(directory.glob(pattern)) for pattern in WEIGHT_PATTERNS)


def save_final(trainer: Any, recipe: Recipe, final: Path) -> None:
    """Save the final model whole (every rank takes part), then make it visible in one rename."""
    from sftdist import distributed

    tmp = final.with_name(final.name + ".partial")
    main = trainer.is_world_process_zero()
    if main and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    distributed.prepare_final_save(trainer)
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if main:
        if not has_weights(tmp):
            raise RuntimeError(f"saving the final model wrote no weights into {tmp}; refusing an empty model")
        write_text_atomic(tmp / RECIPE_FILE, recipe_yaml(recipe))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    trainer.accelerator.wait_for_everyone()
