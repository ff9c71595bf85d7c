"""Resuming a checkpoint written by another number of processes: what a checkpoint records about the run
that wrote it, whether this run may continue it, and what continuing takes.

Gaps filled: the Trainer resumes only at the world size that wrote the checkpoint and checks nothing
(transformers #21271: "resume with identical hyperparameters"). At another world size it silently trains
with another global batch, drops ZeRO optimizer partitions it cannot map (DeepSpeed #5405), and leaves new
ranks without RNG state. Here:

- Every checkpoint's completion marker records the run that wrote it (`facts`): processes, data-parallel
  and sequence-parallel sizes, per-device batch, accumulation, global batch, strategy family and ZeRO stage,
  and the fingerprint of its data.
- `check` refuses, in one line naming the fix, a resume that would change the global batch, the data, or
  the strategy family (plain ddp/single, DeepSpeed ZeRO-k, FSDP2). `global_batch_size` keeps the global batch
  at any world size (recipe.accumulation).
- With the global batch kept, the data position needs nothing more: the sampler's permutation does not
  depend on the world size, accelerate deals consecutive per-device batches round-robin, and the Trainer
  skips `step x accumulation` batches per rank, which is `step x global batch` samples at any world size.
- ZeRO partitions are converted once to DeepSpeed's universal format (`to_universal`), which any world
  size loads; torch DCP (FSDP2) and plain checkpoints (whole model and optimizer) load as they are.
- RNG: a rank of the new world gets a state derived from the seed, the step and its rank (`seed_rng`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sftdist import rundir
from sftdist.data.cache import digest
from sftdist.errors import UserError
from sftdist.recipe import Recipe, accumulation

UNIVERSAL_SUFFIX = "_universal"
FAMILY_WORDS = {"plain": "ddp/single (plain data parallelism)", "fsdp": "FSDP2"}
FAMILY_STRATEGIES = {"plain": "ddp or single", "fsdp": "fsdp2"}


def _family(distributed_type: str | None) -> str:
    return {"DEEPSPEED": "deepspeed", "FSDP": "fsdp"}.get(distributed_type or "", "plain")


def data_fingerprint(inputs: dict[str, Any]) -> dict[str, Any]:
    """The data cache's fingerprint inputs, reduced to digests of what the run trains on, without the paths
    the sources were read from (a source is its content: data/cache.py): everything but the eval sources
    (`rest`: what the data position depends on), the train and eval sources apart (to name which changed),
    and the data encoding's version."""
    data = inputs["data"]
    content = {role: [{k: v for k, v in s.items() if k != "path"} for s in data[role]] for role in ("train", "eval")}
    rest = {**inputs, "data": {**data, "train": content["train"], "eval": None}}
    return {"rest": digest(rest), "train": digest(content["train"]), "eval": digest(content["eval"]),
            "version": inputs["version"]}


def planned(recipe: Recipe, data: dict[str, Any]) -> dict[str, Any]:
    """What this run is, from the recipe and what the launcher set, before the trainer exists."""
    from sftdist import distributed

    world = distributed.world_size()
    accum = accumulation(recipe, world)
    dp = world // recipe.sequence_parallel
    return {
        "world_size": world,
        "data_parallel": dp,
        "sequence_parallel": recipe.sequence_parallel,
        "per_device_train_batch_size": recipe.per_device_batch,
        "gradient_accumulation_steps": accum,
        "global_batch": recipe.per_device_batch * accum * dp,
        "distributed_type": distributed.launched_type(),
        "zero_stage": distributed.launched_zero_stage(),
        "data": data,
    }


_RECORDED = {"world_size": int, "data_parallel": int, "sequence_parallel": int, "per_device_train_batch_size": int,
             "gradient_accumulation_steps": int, "global_batch": int, "global_step": int, "data": dict}


def marker_problem(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint's completion marker, or None. A marker that is not sftdist's JSON, or
    lacks what it records about the run, would otherwise switch off every check of the resume."""
    try:
        marker = json.loads((ckpt / rundir.COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{rundir.COMPLETE_MARKER} is not the JSON sftdist writes"
    if not isinstance(marker, dict) or not isinstance(marker.get("global_step"), int):
        return f"{rundir.COMPLETE_MARKER} holds no global_step"
    if "world_size" not in marker:
        return None  # written before sftdist recorded the run: resumed as before
    bad = [k for k, t in _RECORDED.items() if not isinstance(marker.get(k), t)]
    if not bad and not isinstance(marker["data"].get("rest", marker["data"].get("digest")), str):
        bad = ["data"]
    return f"{rundir.COMPLETE_MARKER} lacks or garbles {', '.join(bad)}" if bad else None


def recorded(ckpt: Path) -> dict[str, Any]:
    """What a checkpoint's marker says about the run that wrote it ({} for a marker that predates this);
    the marker was checked by `marker_problem` when the checkpoint was chosen."""
    marker = json.loads((ckpt / rundir.COMPLETE_MARKER).read_text(encoding="utf-8"))
    return marker if "world_size" in marker else {}


def _strategy_words(facts: dict[str, Any]) -> str:
    family = _family(facts.get("distributed_type"))
    return f"DeepSpeed ZeRO-{facts.get('zero_stage')}" if family == "deepspeed" else FAMILY_WORDS[family]


def _suggested(facts: dict[str, Any]) -> str:
    family = _family(facts.get("distributed_type"))
    if family == "deepspeed":
        stage = facts.get("zero_stage")
        return f"zero{stage}" + (" or zero3-offload" if stage == 3 else "")
    return FAMILY_STRATEGIES[family]


def check_data(ckpt: Path, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Refuse (UserError) a resume whose data position would point into other rows: another data encoding,
    other training data, tokenizer or data settings. Changed eval data only changes what the eval loss is
    measured on: a warning. The paths the data is read from are not part of it (data/cache.py)."""
    if not old:
        return []  # a marker written before sftdist recorded the run: resumed as before
    was, now = old["data"], new["data"]
    # Markers that hold no version were written before it was recorded, by the data encoding of version 3.
    if was.get("version") != now["version"]:
        raise UserError(
            f"{ckpt}: written by an sftdist whose data encoding is version {was.get('version', 3)} (this one's is "
            f"{now['version']}): its data position may point into other rows; finish the run with that sftdist, or "
            "pass --no-resume to start over")
    if "rest" not in was:  # written before sources were identified by their content
        return [f"warning: {ckpt} predates data fingerprints by content: resuming without checking that the data "
                "is the same"]
    if was["rest"] != now["rest"]:
        what = ("the training data (data.train)" if was["train"] != now["train"]
                else "the tokenizer or the data settings")
        raise UserError(
            f"{ckpt}: {what} changed since it was written, so its data position points into other rows; restore "
            "it, or pass --no-resume to start over")
    if was["eval"] != now["eval"]:
        return [f"warning: {ckpt}: the eval data (data.eval) changed since it was written: eval losses before and "
                "after this resume are measured on other rows"]
    return []


def check(recipe: Recipe, ckpt: Path, old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Refuse (UserError) a resume of `ckpt` that could not continue the same run under this strategy and
    batch (the data: `check_data`); else say how it resumes when the world size changed (None when nothing
    changed)."""
    if not old:
        return None  # a marker written before sftdist recorded the run: resumed as before
    same_family = _family(old["distributed_type"]) == _family(new["distributed_type"])
    if not same_family or old["zero_stage"] != new["zero_stage"]:
        raise UserError(
            f"{ckpt}: written under {_strategy_words(old)}, and this run is {_strategy_words(new)}; a checkpoint "
            f"resumes only under the strategy that wrote it, at any number of processes: use --strategy "
            f"{_suggested(old)}, or `sftdist export {ckpt}` and start a new run from the exported model"
        )
    check_world_size(ckpt, old, new["world_size"])
    moved = old["world_size"] != new["world_size"]
    if old["global_batch"] != new["global_batch"]:
        src = recipe.source or "recipe"
        if moved and recipe.global_batch_size is None:
            raise UserError(
                f"{ckpt}: written by {old['world_size']} processes with a global batch of {old['global_batch']}; "
                f"on {new['world_size']} this run would train with {new['global_batch']}. Set global_batch_size: "
                f"{old['global_batch']} in {src} (each run then derives its accumulation), or launch "
                f"{old['world_size']} processes"
            )
        raise UserError(
            f"{ckpt}: trained with a global batch of {old['global_batch']}; this run's is {new['global_batch']} "
            f"(global_batch_size in {src}); keep {old['global_batch']} to resume, or pass --no-resume to start over"
        )
    if not moved:
        return None
    processes = f"{old['world_size']} process{'es' if old['world_size'] != 1 else ''}"
    return (
        f"step {old['global_step']} written by {processes}, now on {new['world_size']} (global batch "
        f"{new['global_batch']} kept: accumulation {old['gradient_accumulation_steps']} -> "
        f"{new['gradient_accumulation_steps']})"
    )


def check_world_size(ckpt: Path, old: dict[str, Any], world_size: int) -> None:
    """Refuse resuming a sequence-parallel ZeRO checkpoint on another number of processes: DeepSpeed's
    universal conversion (0.19.8) takes its sequence-parallel partitions for tensor-parallel ones and fails
    ("tp_degree=2") after the processes started. `sftdist launch` calls this before starting any."""
    sp, written = old.get("sequence_parallel", 1), old.get("world_size")
    if sp > 1 and written != world_size and _family(old.get("distributed_type")) == "deepspeed":
        raise UserError(
            f"{ckpt}: written with sequence_parallel {sp} by {written} processes; DeepSpeed cannot convert a "
            f"sequence-parallel ZeRO checkpoint to another number of processes: launch {written} processes to "
            "resume it, or pass --no-resume to start over")


def _zero_tag(ckpt: Path) -> str:
    """The ZeRO checkpoint folder (global_stepN) the checkpoint's `latest` names."""
    return (ckpt / "latest").read_text(encoding="utf-8").strip()


def to_universal(ckpt: Path) -> float | None:
    """Convert `ckpt`'s ZeRO partitions (written by another world size) to DeepSpeed's universal format, once:
    into `ckpt/<tag>_universal`, built beside and renamed when whole, so a conversion killed midway is never
    used and the next start converts again. Returns the seconds it took, or None when it was already there.

    Gap filled: the Trainer's checkpoints lack DeepSpeed's `universal_checkpoint_info`, so `ds_to_universal`
    refuses them ("Required universal_checkpoint_info state is missing") unless told to inject it, as
    open-instruct does (PR #1517); and it writes `latest_universal` naming its output folder, which here is
    the hidden one it is built in, so that pointer is written again after the rename.
    """
    tag = _zero_tag(ckpt)
    out = ckpt / f"{tag}{UNIVERSAL_SUFFIX}"
    took = None
    if not (out.is_dir() and rundir.check_manifest(out) is None):
        _check_space_to_convert(ckpt, tag)  # before build_beside deletes a stale or damaged conversion
        start = time.perf_counter()
        workers = max(1, min(8, len(os.sched_getaffinity(0))))
        with rundir.build_beside(out, replace=True) as tmp:
            # In a process of its own: its worker pools fork, which deadlocks in a trainer whose torch and
            # gloo threads are running (measured: ZeRO-3's extraction hung in a forked worker).
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / tag),
                   "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", str(workers),
                   "--num_merge_workers", str(max(1, workers // 2))]
            code, stderr = _run_stoppable(cmd, f"while converting {ckpt / tag} to a universal checkpoint")
            if code:
                if _nearly_full(tmp) or "No space left on device" in stderr:  # before the partial copy is deleted
                    raise UserError(
                        f"{ckpt}: no space left on device while converting its ZeRO checkpoint to universal (for "
                        "another number of processes); free some space and run again, or resume on the number of "
                        "processes that wrote it"
                    )
                raise RuntimeError(f"converting {ckpt / tag} to a universal checkpoint failed:\n{stderr[-3000:]}")
            rundir.write_manifest(tmp)
        took = time.perf_counter() - start
    rundir.write_text_atomic(ckpt / "latest_universal", out.name)
    return took


def _check_space_to_convert(ckpt: Path, tag: str) -> None:
    """The universal copy holds what the ZeRO partitions hold (fp32 weights and both Adam moments), so about
    their size must be free beside them; refused in one line before anything is written or deleted."""
    import shutil

    need = sum(f.stat().st_size for f in (ckpt / tag).rglob("*") if f.is_file())
    free = shutil.disk_usage(ckpt).free
    if free < need:
        raise UserError(
            f"{ckpt}: converting its ZeRO checkpoint to universal (for another number of processes) needs about "
            f"{need / (1 << 30):.2f} GiB free beside it, and {free / (1 << 30):.2f} GiB are; free some space, or "
            "resume on the number of processes that wrote it"
        )


def _nearly_full(path: Path) -> bool:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize < (1 << 20)  # under 1 MiB left: the write ran out of space


def _run_stoppable(cmd: list[str], during: str) -> tuple[int, str]:
    """Run `cmd` (exit code, stderr), stopping it when SIGTERM or Ctrl-C asks this process to stop: then this
    process stops too (`preemption.stop_if_requested`: one line, 143/130). In a session of its own, so a Ctrl-C
    to the terminal's process group does not end it midway with a traceback of its own."""
    from sftdist import preemption

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    while True:
        try:
            stderr = proc.communicate(timeout=0.5)[1]
            return proc.returncode, stderr
        except subprocess.TimeoutExpired:
            if preemption.stop_requested():
                proc.terminate()
                proc.communicate()
                preemption.stop_if_requested(during)


def unshare_optimizer_steps(zero_optimizer: Any) -> None:
    """Give every parameter group of a DeepSpeed optimizer loaded from a universal checkpoint its own step count.

    Gap filled (DeepSpeed 0.19.8, ZeRO-3 universal load): every group's state gets the very same `step` tensor,
    which torch's fused AdamW increments in place once per group, so the second group's bias correction runs a
    step ahead of the first's (measured: the norms, AdamW's no-decay group, drifted by 20% of a step in the
    first step after a 2 -> 1 process resume; the other weights were exact).
    """
    import torch

    for state in getattr(zero_optimizer, "optimizer", zero_optimizer).state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def seed_rng(seed: int, step: int, rank: int) -> None:
    """Give this rank an RNG state derived from the run's seed, the step and its rank: the checkpoint's
    per-rank states belong to another world and may not exist for this rank."""
    from transformers import set_seed

    derived = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    set_seed(int.from_bytes(derived[:4], "little"))
