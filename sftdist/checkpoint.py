"""Output directory ownership, atomic checkpoints, resume, preemption and the final save.

Gaps filled: transformers writes `checkpoint-N` in place and rotates old ones before the new one
is known to be whole, so a kill mid-write leaves a directory that `resume_from_checkpoint=True`
picks up. Here a checkpoint counts only once every rank has finished it and rank 0 has written a
manifest of its files and sizes, then `COMPLETE_MARKER`, into it (rundir.py); rotation runs after that.
Resume checks the manifest, so a file lost or cut short since is a fallback to the previous
checkpoint, not a silently inexact resume. SIGTERM/SIGUSR1/SIGINT (slurm preemption, Ctrl-C) make
the run save at the next step boundary and exit with `EXIT_PREEMPTED`; `sftdist train` installs
that handling before its imports, so a signal during loading stops the run after its first step.
A rerun of a finished run does nothing, and a run whose newest checkpoint is at its last step
writes `final/` from it without training (the Trainer would otherwise train one step more).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from sftdist import distributed, divergence, lock, preemption, prompt_style, rundir
from sftdist.errors import UserError
from sftdist.recipe import Recipe, recipe_from_dict, run_identity
from sftdist.rundir import (
    CHECKPOINT_RE,
    COMPLETE_MARKER,
    FINAL_DIR,
    FSDP_SHARDS,
    RECIPE_FILE,
    RUN_INFO,
    TRAINER_STATE,
    write_json_atomic,
    write_text_atomic,
)

if TYPE_CHECKING:
    from sftdist.data.pipeline import DataReport

WEIGHT_PATTERNS = ("model*.safetensors", "adapter_model.safetensors", FSDP_SHARDS, "*.distcp")

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


def _same_recipe(recipe: Recipe, saved: Path) -> bool:
    """Whether output_dir's saved recipe is this run's (however each expresses its global batch)."""
    try:
        if not saved.is_file():
            return False
        raw = yaml.safe_load(saved.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            return False
        try:  # with this version's defaults filled in: a key added since the run started changes nothing
            raw = recipe_from_dict(raw, source=str(saved)).to_dict()
        except UserError:
            return False
        return run_identity(raw) == run_identity(recipe.to_dict())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError(f"{saved}: is not a valid recipe file; pass --overwrite to replace this output_dir") from None


def _contents(out: Path) -> list[Path]:
    """What output_dir holds, the lock of the running run aside."""
    return [p for p in out.iterdir() if p.name != lock.LOCK_FILE]


def _refuse_deleting_inputs(recipe: Recipe, doomed: list[Path], why: str) -> None:
    """Refuse to delete any of `doomed` that is, or holds, something this run reads, or the working directory."""
    inputs = [("the model", recipe.model.name_or_path), ("the recipe", recipe.source), ("the working directory", ".")]
    inputs += [("the data", s.path) for s in (*recipe.data.train, *recipe.data.eval)]
    if recipe.data.chat_template:
        inputs.append(("the chat template", recipe.data.chat_template))
    for target in doomed:
        t = target.resolve()
        for what, raw in inputs:
            if raw and os.path.lexists(raw) and (t == Path(raw).resolve() or t in Path(raw).resolve().parents):
                raise UserError(
                    f"{target}: {why} would delete {what} ({raw}), which this recipe reads; choose another output_dir"
                )


def _resumable(out: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint that verifies, and a warning for each newer one that does not."""
    from sftdist import resume as resuming

    ckpts, skipped = complete_checkpoints(out), []
    for ckpt in reversed(ckpts):
        # Checkpoints written before manifests existed are vouched for by their marker alone.
        problem = rundir.check_manifest(ckpt) if (ckpt / rundir.MANIFEST).is_file() else None
        problem = problem or resuming.marker_problem(ckpt)
        if problem is None:
            return ckpt, [f"warning: {c}; falling back to {ckpt.name}" for c in skipped]
        skipped.append(f"{ckpt}: {problem}")
    if skipped:
        raise UserError(
            f"{out}: no checkpoint can be resumed ({'; '.join(skipped)}); pass --no-resume to start over"
        )
    return None, []


@dataclass
class Claim:
    """What this run does with output_dir: decided before any heavy work (every rank, read-only), carried out
    by `claim_output_dir` once the trainer exists, so that a check failing in between leaves output_dir as it was."""

    action: str  # fresh | resume | restart | replace | finished
    checkpoint: Path | None = None
    warnings: list[str] = field(default_factory=list)
    moved: str | None = None  # how the world size changed since the checkpoint (resume.check), if it did
    model_only: bool = False  # the checkpoint holds no optimizer state (train.save_only_model)


def _finished_global_batch(path: Path) -> int | None:
    """The global batch a finished run recorded in its run file (None: recorded before it was)."""
    try:
        batch = json.loads(path.read_text(encoding="utf-8"))["distributed"].get("global_batch")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        batch = ""
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool)):
        raise UserError(
            f"{path}: is not the run file sftdist wrote (a JSON object whose distributed.global_batch is a number); "
            "restore it, or pass --no-resume to train the run again"
        )
    return batch


def decide(recipe: Recipe, facts: dict[str, Any], resume: bool, overwrite: bool) -> Claim:
    """What to do with output_dir for this run (`facts`: resume.planned), or a UserError saying why not."""
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output_dir exists and is not a directory")
    if not out.exists() or not _contents(out):
        return Claim("fresh")
    saved = out / RECIPE_FILE
    if overwrite:
        if not saved.is_file():
            raise UserError(
                f"{out}: --overwrite refused: output_dir is not empty and holds no {RECIPE_FILE}, so it is not "
                "an sftdist run; choose another output_dir"
            )
        _refuse_deleting_inputs(recipe, [out], "--overwrite")
        return Claim("replace")
    if not _same_recipe(recipe, saved):
        what = "another recipe's run" if saved.is_file() else "files that are not an sftdist run"
        raise UserError(
            f"{out}: output_dir holds {what}; choose another output_dir, or pass --overwrite to replace it"
        )
    if resume and (out / RUN_INFO).is_file() and (out / FINAL_DIR).is_dir():
        trained = _finished_global_batch(out / RUN_INFO)
        if trained not in (None, facts["global_batch"]):
            raise UserError(
                f"{out}: holds a finished run of this recipe trained with a global batch of {trained}; this run's "
                f"would be {facts['global_batch']}; choose another output_dir, or pass --no-resume to train it again"
            )
        return Claim("finished", out / FINAL_DIR)
    ckpt, warnings = _resumable(out) if resume else (None, [])
    if ckpt is None:
        _refuse_deleting_inputs(recipe, _restart_doomed(out), "starting over")
        return Claim("restart", warnings=warnings)
    from sftdist import resume as resuming

    recorded = resuming.recorded(ckpt)
    warnings += resuming.check_data(ckpt, recorded, facts)
    moved = resuming.check(recipe, ckpt, recorded, facts)
    model_only = not _has_optimizer_state(ckpt)
    if model_only:
        if facts["distributed_type"] in ("DEEPSPEED", "FSDP"):
            raise UserError(
                f"{ckpt}: holds the model only (train.save_only_model: true), which DeepSpeed and FSDP cannot resume "
                "from (they restore sharded optimizer state); pass --no-resume to start over"
            )
        warnings.append(
            f"warning: {ckpt} holds the model only (train.save_only_model: true): resuming with the learning-rate "
            f"schedule at its step; the optimizer's moments start again from zero"
        )
    return Claim("resume", ckpt, warnings, moved, model_only)


def _has_optimizer_state(ckpt: Path) -> bool:
    """Whether the checkpoint can restore its optimizer: plain (optimizer.pt), FSDP (optimizer_0/ sharded,
    optimizer.bin full state dict) or DeepSpeed (global_stepN/) optimizer files."""
    return any(ckpt.glob("optimizer*")) or any(ckpt.glob("global_step*"))


def _restart_doomed(out: Path) -> list[Path]:
    """What starting over removes: only what sftdist (and the Trainer under it) wrote at the top of output_dir."""
    ours = {FINAL_DIR, RUN_INFO, TRAINER_STATE}
    return [p for p in out.iterdir()
            if CHECKPOINT_RE.match(p.name) or p.name in ours or p.name.startswith(f".{FINAL_DIR}.partial-")]


def lock_output_dir(recipe: Recipe, args: Any) -> lock.RunLock | None:
    """Rank 0 locks output_dir for the whole run (the other ranks of a launch belong to the same run);
    released by `RunLock.release()` at the end of the run, or at exit."""
    held = distributed.rank_zero_only(args, lambda: lock.acquire(Path(recipe.output_dir)))
    if held is not None:
        atexit.register(held.release)
    return held


def claim_output_dir(trainer: Any, recipe: Recipe, claim: Claim, report: DataReport) -> str | None:
    """Carry out `claim` (rank 0 first: delete what it replaces, write the recipe, convert a ZeRO checkpoint
    of another world size to universal) and prepare the trainer to resume; return the checkpoint, if any."""
    from sftdist import resume as resuming

    out, args = Path(recipe.output_dir), trainer.args
    deepspeed = trainer.accelerator.distributed_type.name == "DEEPSPEED"

    def carry_out() -> float | None:
        doomed = _contents(out) if claim.action == "replace" else []
        doomed += _restart_doomed(out) if claim.action == "restart" else []
        with _disk_full_is_user_error(out):
            for p in doomed:  # the lock file stays: this run holds it
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / RECIPE_FILE, recipe_yaml(recipe))
            prompt_style.record(recipe, report)  # how generation renders prompts; every checkpoint and final/ carry it
            return resuming.to_universal(claim.checkpoint) if claim.moved and deepspeed else None

    converted = distributed.rank_zero_only(args, carry_out)
    if claim.checkpoint is None:
        return None
    trainer.sftdist_reseed = claim.moved is not None
    trainer.sftdist_model_only = claim.model_only
    if claim.moved and deepspeed:
        # DeepSpeed reads this when the trainer builds its engine (at train()); `latest_universal` names the folder.
        trainer.accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True
    if args.process_index == 0:
        for warning in claim.warnings:
            click.echo(warning, err=True)
        how = f": {claim.moved}" if claim.moved else ""
        if claim.moved and deepspeed:
            how += ("; ZeRO checkpoint already in universal format" if converted is None
                    else f"; ZeRO checkpoint converted to universal in {converted:.1f} s")
        print(f"sftdist: resuming from {claim.checkpoint}{how}", flush=True)
    return str(claim.checkpoint)


@contextlib.contextmanager
def _disk_full_is_user_error(path: Path) -> Iterator[None]:
    """A full disk while saving becomes one line naming `path` (torch reports it as 'unexpected pos N vs M')."""
    try:
        yield
    except Exception as e:
        if not _disk_full(e, path):
            raise
        raise UserError(
            f"{path}: no space left on device while saving; it is not marked complete. Free some space "
            "(or lower train.save_total_limit) and run the same command again"
        ) from None


def _disk_full(exc: BaseException | None, path: Path) -> bool:
    """ENOSPC/EDQUOT in the exception chain or its text (safetensors), or, for writers that lose the
    errno (torch.save), a filesystem with (almost) no space left."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(exc) for text in ("No space left on device", "Disk quota exceeded")):
            return True
        exc = exc.__cause__ or exc.__context__
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)  # under 1 MiB left: the write ran out of space


def make_trainer_class(base: type, max_shard_size: str) -> type:
    """SFTTrainer with atomic, verified, sharded checkpoints and signal-triggered saves."""
    from transformers import PreTrainedModel, TrainerCallback

    stop = preemption.install()

    class SignalCallback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if distributed.any_rank(stop.requested):
                control.should_save = True
                control.should_training_stop = True
                state.sftdist_preempted = True
            return control

    class RecipeCadence(TrainerCallback):
        """A resumed Trainer logs and saves at the cadence stored in the checkpoint's trainer state; the
        recipe's (which may change between a run and its resume, recipe.run_identity) applies instead."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            state.compute_steps(args, state.max_steps)

    class SftdistTrainer(base):
        preempted = property(lambda self: getattr(self.state, "sftdist_preempted", False))
        sftdist_facts: dict[str, Any] = {}  # what checkpoint markers record about this run (resume.planned)
        sftdist_reseed = False  # resumed at another world size: RNG from seed, step and rank (claim_output_dir)
        sftdist_model_only = False  # resumed from a checkpoint without optimizer state (claim_output_dir)

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, callbacks=[SignalCallback(), RecipeCadence()], **kw)

        # The overrides below are Trainer internals (it has no public hook for them): the RNG and optimizer
        # restore, the epoch loop, the model save inside a checkpoint, and the checkpoint save itself.
        def _load_rng_state(self, checkpoint: str | None) -> None:
            # The checkpoint's per-rank RNG states belong to the world that wrote it.
            if checkpoint is not None and self.sftdist_reseed:
                from sftdist.resume import seed_rng

                seed_rng(self.args.seed, self.state.global_step, self.args.process_index)
                return
            super()._load_rng_state(checkpoint)

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            super()._load_optimizer_and_scheduler(checkpoint)  # under DeepSpeed, right after the engine loaded
            if checkpoint is not None and self.sftdist_reseed and self.is_deepspeed_enabled:
                from sftdist.resume import unshare_optimizer_steps

                unshare_optimizer_steps(self.model_wrapped.optimizer)
            if checkpoint is not None and self.sftdist_model_only:
                # No scheduler state was saved: move the schedule to the resumed step instead of restarting it.
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": on purpose
                    for _ in range(self.state.global_step):
                        self.lr_scheduler.step()

        def _run_epoch(self, *a: Any, **kw: Any) -> None:
            # Resumed from a checkpoint at the last step, the Trainer would train one step more.
            if self.state.global_step >= self.state.max_steps:
                self.control.should_training_stop = True
                return
            super()._run_epoch(*a, **kw)

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

        def _maybe_log_save_evaluate(self, tr_loss: Any, grad_norm: Any, *a: Any, **kw: Any) -> None:
            divergence.check_step(self, tr_loss, grad_norm)  # before this step's log and checkpoint
            super()._maybe_log_save_evaluate(tr_loss, grad_norm, *a, **kw)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            run_dir = Path(self.args.output_dir)
            ckpt = run_dir / f"checkpoint-{self.state.global_step}"
            divergence.check_weights(self, str(ckpt))
            if self.args.should_save and ckpt.exists():  # a leftover of an earlier try: start it empty
                shutil.rmtree(ckpt)
            self.accelerator.wait_for_everyone()
            start = time.perf_counter()
            limit = self.args.save_total_limit
            self.args.save_total_limit = None  # rotate only once the new checkpoint is complete
            try:
                with _disk_full_is_user_error(ckpt):
                    super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                with _disk_full_is_user_error(ckpt):
                    rundir.copy_run_files(run_dir, ckpt)
                    rundir.write_manifest(ckpt)
                    write_json_atomic(ckpt / COMPLETE_MARKER, {"global_step": self.state.global_step,
                                                               **self.sftdist_facts})
                _rotate(run_dir, limit)
                print(f"sftdist: {ckpt.name} written in {time.perf_counter() - start:.1f} s", flush=True)
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
    divergence.check_weights(trainer, str(final))
    main = trainer.is_world_process_zero()
    building = rundir.build_beside(final, replace=True, shared_by="ranks") if main else contextlib.nullcontext(
        rundir.partial_path(final, shared_by="ranks"))
    with building as tmp:
        trainer.accelerator.wait_for_everyone()
        distributed.prepare_final_save(trainer)
        with _disk_full_is_user_error(tmp):
            trainer.save_model(str(tmp))
        trainer.accelerator.wait_for_everyone()
        if main:
            if not has_weights(tmp):
                raise RuntimeError(f"saving the final model wrote no weights into {tmp}; refusing an empty model")
            if recipe.method == "full":  # one dtype whatever the strategy gathered (save_dtype.py)
                from sftdist import save_dtype
                from sftdist.model import has_cuda, load_config

                with _disk_full_is_user_error(tmp):
                    save_dtype.cast_model_dir(tmp, save_dtype.resolve(recipe.save_dtype, load_config(recipe), has_cuda()))
            with _disk_full_is_user_error(tmp):
                rundir.copy_run_files(Path(recipe.output_dir), tmp)
    trainer.accelerator.wait_for_everyone()
