"""What accelerate/DeepSpeed need to be REALLY distributed on CPU, and the check that they are.

Gap filled: accelerate and trl assume CUDA. On a CPU machine, `MULTI_CPU` configs start one process,
`MULTI_GPU` configs start N independent runs, and DeepSpeed disagrees with accelerate on the world
size unless the backend is gloo (see ../shared/notes/platform.md). These functions are called by
train.py in every rank: before the SFTConfig is built, and once the trainer exists.
"""

from __future__ import annotations

import os
from typing import Any


def training_overrides() -> dict[str, Any]:
    """SFTConfig kwargs this machine needs (CPU: no bf16/fp16, gloo for several processes)."""
    import torch

    overrides: dict[str, Any] = {}
    if not torch.cuda.is_available():
        overrides.update(bf16=False, fp16=False)
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            overrides["use_cpu"] = True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            overrides["ddp_backend"] = "gloo"
    return overrides


def check_state(trainer: Any) -> dict[str, Any]:
    """Fail if the launcher started N processes that did not join one group; return what we got."""
    from sftdist.errors import UserError

    acc = trainer.accelerator
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    state = {
        "distributed_type": str(acc.distributed_type).split(".")[-1],
        "num_processes": acc.num_processes,
        "global_batch": trainer.args.per_device_train_batch_size
        * trainer.args.gradient_accumulation_steps
        * acc.num_processes,
    }
    if acc.num_processes != expected:
        raise UserError(
            f"the launcher started {expected} processes but this one trains alone "
            f"(distributed_type={state['distributed_type']}, num_processes={acc.num_processes}); "
            "refusing a silent duplicate run"
        )
    return state


def prepare_final_save(trainer: Any) -> None:
    """Make `save_model` write whole weights: under FSDP `SHARDED_STATE_DICT` it writes nothing."""
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
