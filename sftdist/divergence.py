"""A diverged run stops at the step it diverged, and no non-finite weight is ever saved.

Gap filled: the Trainer trains on through a NaN or infinite loss, and by default
(`logging_nan_inf_filter`) logs it as the mean of the earlier losses, or 0 on the first step. A learning
rate of `.inf` or a typo like `2e5` therefore exits 0 with every weight of every checkpoint and of
`final/` non-finite, while the log shows a loss of 0. Here (sftdist's default turns that filter off):

- after each optimizer step, before its log and checkpoint, a non-finite loss (this rank's, since the last
  log) or gradient norm (global) on any rank stops every rank with one line naming the step;
- before any checkpoint or `final/` is written, every rank checks its own part of the weights (a ZeRO-3
  partition, an FSDP2 shard, or the whole model), so the last checkpoint kept is the last finite one.

Each check costs one flag all-reduced across the ranks (the Trainer already synchronises each step's loss
on the host to apply that filter) and, at a save, one pass over the local weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from sftdist import distributed
from sftdist.errors import UserError


class Diverged(UserError):
    """Training produced a non-finite loss, gradient or weight."""


def _fix(trainer: Any) -> str:
    """The advice of both refusals; the Trainer's progress bar is closed first, so that the line stands alone."""
    from transformers.trainer_callback import ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
            callback.training_bar.close()
    return (f"lower train.learning_rate (now {trainer.args.learning_rate:g}) or find the cause, then start over "
            "with --no-resume")


def check_step(trainer: Any, tr_loss: Any, grad_norm: Any) -> None:
    """Stop every rank when this optimizer step's loss or gradient norm is not finite on any rank."""
    import torch

    loss_ok = bool(torch.isfinite(tr_loss).all())
    norm = None if grad_norm is None else float(grad_norm)
    if not distributed.any_rank(not (loss_ok and (norm is None or math.isfinite(norm)))):
        return
    step = trainer.state.global_step
    what = f"the loss is {float(tr_loss.sum()):g}" if not loss_ok else "the loss is finite"
    if norm is not None:
        what += f" and the gradient norm is {norm:g}"
    raise Diverged(
        f"training diverged at step {step}: {what} (on this or another process); nothing of step {step} was saved, "
        f"so the newest checkpoint in {trainer.args.output_dir} holds finite weights; {_fix(trainer)}")


def _local_parts(model: Any) -> Iterator[tuple[str, Any]]:
    """Each trained parameter's part held by this rank: a ZeRO-3 partition, an FSDP2 shard, or the whole tensor.
    Frozen weights are left out: the optimizer never changes them, and QLoRA stores its packed 4-bit bytes in a
    float dtype under ZeRO-3/FSDP2, where any byte pattern (a NaN's too) is valid."""
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = getattr(p, "ds_tensor", None)
        if part is None:
            part = p.to_local() if hasattr(p, "to_local") else p
        yield name, part


def check_weights(trainer: Any, where: str) -> None:
    """Refuse to write `where` (a checkpoint or final/) when any rank holds a non-finite weight."""
    import torch

    bad = None
    with torch.no_grad():
        for name, part in _local_parts(trainer.model):
            if part.numel() and part.is_floating_point() and not bool(torch.isfinite(part).all()):
                bad = name
                break
    if distributed.any_rank(bad is not None):
        raise Diverged(
            f"training diverged by step {trainer.state.global_step}: the weights are not finite "
            f"({bad or 'on another process'}), so {where} was not written and the newest checkpoint in "
            f"{trainer.args.output_dir} holds finite weights; {_fix(trainer)}")
