"""What accelerate/DeepSpeed need to be REALLY distributed on CPU, and the check that they are.

Gap filled: accelerate and trl assume CUDA. On a CPU machine, `MULTI_CPU` configs start one process,
`MULTI_GPU` configs start N independent runs, DeepSpeed disagrees with accelerate on the world size
unless the backend is gloo, `use_cpu` silently turns a DeepSpeed run into plain DDP, and accelerate
never enables FSDP on a CPU state (each measured on a 2-process CPU machine). These functions are
called by train.py in every rank: before the SFTConfig is built, and once the trainer exists.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sftdist.errors import UserError
from sftdist.strategies import deepspeed_stage

T = TypeVar("T")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def launched_type() -> str | None:
    """The distributed type `accelerate launch` asked for (via its environment), if it asked for one."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "DEEPSPEED"
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return None


def world_size() -> int:
    """Processes of this run, as the launcher (torchrun, `accelerate launch`) set them; 1 when run alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_zero_stage() -> int | None:
    """The ZeRO stage `accelerate launch` asked for, or None when it did not launch DeepSpeed."""
    if launched_type() != "DEEPSPEED":
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is not None:
        return int(stage)
    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")  # accelerate does not export a JSON's stage
    return deepspeed_stage(Path(ds_file)) if ds_file and Path(ds_file).is_file() else None


def rank_zero_only(args: Any, fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 alone (None elsewhere); the other ranks wait for it, and a UserError it raises is
    raised on every rank (quietly: rank 0 prints it). What rank 0 alone decides or refuses (the output_dir
    lock, the files it writes there) then stops the launch in one line, instead of every other rank failing
    in its next collective with the transport's traceback."""
    import torch.distributed as dist

    if args.world_size == 1:  # `args`: the SFTConfig, whose process group exists once it is asked for its rank
        return fn()
    outcome: list[Any] = [None]
    result = error = None
    if args.process_index == 0:
        try:
            result = fn()
        except UserError as e:
            error, outcome = e, [str(e)]
        except SystemExit as e:  # a signal stopped it (preemption.stop_if_requested): every rank stops alike
            error, outcome = e, [e.code]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if isinstance(outcome[0], int):
        raise SystemExit(outcome[0])
    if outcome[0] is not None:
        raise UserError(outcome[0], shown_elsewhere=True)
    return result


@contextlib.contextmanager
def reported_once() -> Iterator[None]:
    """Around the checks every rank makes alike before training (the recipe, the data, output_dir): a
    UserError is printed by local rank 0 of each node only, not once per process."""
    try:
        yield
    except UserError as e:
        if os.environ.get("LOCAL_RANK", "0") != "0":
            e.shown_elsewhere = True
        raise


def any_rank(flag: bool) -> bool:
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


def shards_parameters() -> bool:
    """True under FSDP or ZeRO-3 (as `accelerate launch` asked), which flatten and shard parameters."""
    return launched_type() == "FSDP" or launched_zero_stage() == 3


def training_overrides() -> dict[str, Any]:
    """SFTConfig kwargs this machine needs (CPU: float32, gloo, and the state DeepSpeed/FSDP need)."""
    import torch

    overrides: dict[str, Any] = {}
    if torch.cuda.is_available():
        return overrides
    overrides.update(bf16=False, fp16=False)
    if world_size() > 1:
        # Without gloo, DeepSpeed counts one process while accelerate counts WORLD_SIZE.
        overrides["ddp_backend"] = "gloo"
    kind = launched_type()
    if kind == "DEEPSPEED":
        return overrides  # use_cpu would make accelerate drop DeepSpeed and run plain DDP
    overrides["use_cpu"] = True
    if kind == "FSDP":
        _configure_fsdp_on_cpu()
        # The trainer must keep the state built above instead of rebuilding a CPU one.
        overrides["accelerator_config"] = {"use_configured_state": True}
    return overrides


def _configure_fsdp_on_cpu() -> None:
    """A gloo process group labelled multi-GPU with device cpu: the only state accelerate builds FSDP on."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True, backend="gloo")
    state.distributed_type = DistributedType.MULTI_GPU


def verified_state(trainer: Any) -> dict[str, Any]:
    """What the run really is (distributed type, processes, batch sizes); a UserError if the processes
    did not join one group of the launched kind. Rank 0 prints it (train.py), so every run's log says it."""
    acc = trainer.accelerator
    args = trainer.args
    expected = world_size()
    pc = getattr(acc, "parallelism_config", None)
    # Under sequence parallelism N processes share each sample: the batch is counted once per N processes.
    sequence_parallel = pc.sp_size if pc is not None else 1
    data_parallel = acc.num_processes // sequence_parallel
    state: dict[str, Any] = {
        "distributed_type": acc.distributed_type.name,
        "num_processes": acc.num_processes,
        "num_machines": max(1, expected // int(os.environ.get("LOCAL_WORLD_SIZE", expected or 1))),
        "backend": acc.state.backend,
        "device": str(acc.device),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "sequence_parallel": sequence_parallel,
        "data_parallel": data_parallel,
        "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * data_parallel,
    }
    if acc.distributed_type.name == "DEEPSPEED":
        state["zero_stage"] = acc.state.deepspeed_plugin.zero_stage
    if acc.distributed_type.name == "FSDP":
        state["fsdp_version"] = acc.state.fsdp_plugin.fsdp_version
    if acc.num_processes != expected:
        raise UserError(
            f"the launcher started {expected} processes but this one trains alone "
            f"(distributed_type={state['distributed_type']}, num_processes={acc.num_processes}); "
            "refusing a silent duplicate run"
        )
    kind = launched_type()
    if kind is not None and state["distributed_type"] != kind:
        raise UserError(
            f"accelerate launch asked for {kind} but the trainer runs {state['distributed_type']}; "
            "refusing a run that would not shard as configured"
        )
    return state


def install_callbacks(trainer: Any) -> None:
    """The tokens-per-step report, and the clean release of the process groups at exit."""
    if world_size() > 1:
        atexit.register(_release_process_groups)
    trainer.add_callback(_tokens_per_step_logger())


def _release_process_groups() -> None:
    """Gap: at exit, a gloo worker thread may still be freeing the last collective's tensors, which
    needs the GIL; if the interpreter is already finalizing, that thread dies inside a C++ destructor
    and the rank aborts ("terminate called without an active exception", exit -6) after a successful
    run. Destroying the groups and then releasing the GIL briefly lets those threads finish first."""
    import time

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    time.sleep(0.5)


def _tokens_per_step_logger() -> Any:
    """A callback that prints, from rank 0, the tokens one optimizer step sees across all ranks."""
    from transformers import TrainerCallback

    class TokensPerStep(TrainerCallback):
        first: tuple[int, float] | None = None
        done = False

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            # trl's num_tokens is gathered over all ranks and counted from this process's start (not
            # restored on resume), so the difference between two logs is what the ranks really shared.
            if self.done or not logs or "num_tokens" not in logs:
                return
            now = (state.global_step, float(logs["num_tokens"]))
            if self.first is None or now[0] == self.first[0]:
                self.first = now
                return
            self.done = True
            if state.is_world_process_zero:
                per_step = (now[1] - self.first[1]) / (now[0] - self.first[0])
                print(f"sftdist: {per_step:.0f} tokens per optimizer step (all processes)", flush=True)

    return TokensPerStep()


def prepare_final_save(trainer: Any) -> None:
    """Make `save_model` write whole weights: under FSDP `SHARDED_STATE_DICT` it writes nothing."""
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
