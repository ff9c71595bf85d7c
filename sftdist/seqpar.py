"""Sequence parallelism (`sequence_parallel: N`): N processes share every sample, each holding 1/N of its tokens.

Gap filled: transformers, trl and accelerate already run DeepSpeed's Ulysses (ALST) when the trainer is given an
accelerate `ParallelismConfig(sp_size=N, sp_backend="deepspeed")`: the dataloader adapter splits each batch along
the sequence, and the attention swaps heads for tokens with two all-to-alls. What they leave to the caller: which
runs can do that at all (only under DeepSpeed, with a world size that N divides), checked in the launcher before
any process starts and again in every rank; packed rows, which Ulysses' adapter cannot take and whose samples its
attention lets attend to each other (`seqpar_batches`, `seqpar_attention`); the padding, which gloo needs equal
across the group and which is kept to the group's longest batch of the step (`seqpar_batches`); and the loss, whose
gradient and token weighting `install` corrects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from sftdist.errors import UserError
from sftdist.recipe import Recipe
from sftdist.seqpar_attention import packed_name, use_packed_attention
from sftdist.seqpar_batches import pad_to_group

# The attention implementations that keep samples apart under Ulysses: sdpa and eager through seqpar_attention (which
# DeepSpeed 0.19.8 refuses to wrap as "eager"), flash attention from the gathered position_ids. Not flex attention,
# whose block mask Ulysses rebuilds as one causal row.
SP_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def check(recipe: Recipe, kind: str | None, world_size: int, strategy: str | None = None) -> None:
    """Refuse a recipe with `sequence_parallel > 1` that cannot run as asked, naming what to use instead.

    `kind` is the launched distributed type ('deepspeed', 'ddp', 'fsdp', 'single', or None for a plain
    process) and `world_size` the total number of processes.
    """
    n = recipe.sequence_parallel
    if n == 1:
        return
    src = recipe.source or "recipe"
    if kind != "deepspeed":
        how = f"--strategy {strategy} is not DeepSpeed" if strategy else "this run was not launched with DeepSpeed"
        raise UserError(
            f"{src}: sequence_parallel: {n} runs on DeepSpeed's Ulysses, but {how}; use `sftdist launch` with "
            f"--strategy zero1, zero2 or zero3 and --num-processes a multiple of {n}"
        )
    if world_size % n:
        raise UserError(
            f"{src}: sequence_parallel: {n} needs a number of processes that {n} divides (each sample is shared "
            f"by {n}); got {world_size}"
        )
    from sftdist.model import resolve_attention

    impl = resolve_attention(recipe)
    if impl not in SP_ATTENTION:
        raise UserError(
            f"{src}: sequence_parallel: {n} needs model.attn_implementation {', '.join(SP_ATTENTION)} (Ulysses "
            f"wraps one of those); got {impl}"
        )
    check_packed_micro_batch(recipe)


def check_packed_micro_batch(recipe: Recipe) -> None:
    """Refuse packing under `sequence_parallel > 1` with more than one packed row per micro-batch.

    Gap: DeepSpeed 0.19.8's Ulysses attention reshapes every layer's inputs to the micro-batch size it was
    registered with (accelerate 1.15 passes per_device_train_batch_size), while trl 1.16's padding-free collator
    joins the micro-batch's packed rows into one row. One packed row per micro-batch is also all SP needs: a row
    holds up to max_length tokens, and more rows per step come from gradient accumulation.
    """
    batch = recipe.per_device_batch
    if recipe.sequence_parallel > 1 and recipe.data.packing and batch != 1:
        raise UserError(
            f"{recipe.source or 'recipe'}: sequence_parallel: {recipe.sequence_parallel} with data.packing takes one "
            f"packed row (up to data.max_length tokens) per micro-batch; set train.per_device_train_batch_size: 1 "
            f"and raise gradient_accumulation_steps for more rows per step (got {batch})"
        )


def training_overrides(recipe: Recipe) -> dict[str, Any]:
    """SFTConfig kwargs for sequence parallelism (none when `sequence_parallel` is 1), after checking this rank."""
    n = recipe.sequence_parallel
    if n == 1:
        return {}
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    from sftdist.distributed import launched_type, world_size
    from sftdist.model import resolve_attention

    launched, world = launched_type(), world_size()
    check(recipe, launched.lower() if launched else None, world)
    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True)
    # accelerate 1.15 checks sp_attn_implementation against its own list (sdpa, flash, hub kernels) and refuses the
    # names registered with transformers' AttentionInterface, which DeepSpeed wraps as well; so it is set after that
    # check, to the implementation `install` switches the model to.
    handler.sp_attn_implementation = packed_name(resolve_attention(recipe))
    return {
        # Resuming: the trainer's own skip fails on DeepSpeed's adapter; `install` skips instead.
        "ignore_data_skip": True,
        # dp_shard_size: accelerate sizes DeepSpeed's train_batch_size by it (ZeRO shards over every process anyway).
        "parallelism_config": ParallelismConfig(dp_shard_size=world // n, sp_size=n, sp_backend="deepspeed",
                                                sp_handler=handler),
    }


def install(trainer: Any, recipe: Recipe) -> bool:
    """Make `trainer` under sequence parallelism train as one process would (attention, padding, loss, resume);
    True if SP is on.

    Gaps filled (transformers 5.24, trl 1.16, DeepSpeed 0.19.8; measured in tests/test_sequence_parallel.py):

    - Gradient scale. Every SP rank computes the whole sample's loss from all ranks' shard losses
      (`deepspeed_sp_compute_loss`, a differentiable all_gather whose backward sums the N ranks' gradients), which
      is right when the engine then averages gradients over every rank. ZeRO-3's reduce-scatter does; ZeRO-0/1/2
      (and ZeRO-3's contiguous all-reduce, used when `reduce_scatter` is off) divide by the data-parallel size only,
      so there the loss is right and its gradient N times too large: grad_norm reads N x, and each update is N x
      too large unless clipping or Adam hide it. Here that gradient is divided by N.
    - Groups that do not start at rank 0 (data-parallel size > 1) on gloo: the SP loss gathers the ranks' losses
      with `torch.distributed.nn.functional.all_gather`, whose gloo backward (torch 2.13, `_AlltoAll`) passes
      group-local ranks to `dist.scatter` as global ones ("Global rank 0 is not part of group"). During the loss
      that function is replaced by one whose backward is an all-reduce, correct on every backend and group.
    - Resuming mid-epoch: the trainer fast-forwards its dataloader with accelerate's `skip_first_batches`, which
      needs a `DataLoader` and fails on DeepSpeed's adapter ("'UlyssesSPDataLoaderAdapter' object has no attribute
      'dataset'"). `training_overrides` turns that skip off and a callback here draws the trained micro-batches
      from the adapter before the first step (unless the recipe sets `train.ignore_data_skip: true` itself).
    - Packed rows: the model's attention becomes `seqpar_attention`'s per-sample one, and the training DataLoader
      is wrapped so that the batches DeepSpeed's adapter splits share the group's length (`seqpar_batches`).
    - Token weighting. Without SP, trl weights every micro-batch of an optimizer step (accumulation steps and
      data-parallel ranks) by its loss tokens. Under SP the trainer drops that count (`labels` are gone from the
      SP batches) and averages the micro-batches' mean losses instead. Here each micro-batch's loss is weighted
      by its share of the step's loss tokens, so the logged loss and the gradients are the token-weighted ones.
    """
    from sftdist.model import unwrapped

    pc = getattr(trainer.accelerator, "parallelism_config", None)
    if pc is None or pc.sp_size == 1:
        return False
    zero = trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3 and zero.get("reduce_scatter", True) is False:
        raise UserError(
            "sequence_parallel with ZeRO-3 needs zero_optimization.reduce_scatter: true in the DeepSpeed config "
            "(its all-reduce path scales sequence-parallel gradients differently); remove reduce_scatter: false"
        )
    gradient_scale = 1.0 if int(zero.get("stage", 0)) == 3 else 1.0 / pc.sp_size
    data_parallel = trainer.accelerator.num_processes // pc.sp_size
    step_tokens: list[Any] = [None]  # loss tokens of the current optimizer step, all ranks
    count_items, compute_loss = trainer._get_num_items_in_batch, trainer.compute_loss

    def count_step_tokens(batch_samples: list, device: Any) -> Any:
        import torch

        if batch_samples and "shift_labels" in batch_samples[0]:  # the SP adapter's training batches
            local = sum((b["shift_labels"] != -100).sum() for b in batch_samples)
            step_tokens[0] = trainer.accelerator.reduce(torch.as_tensor(local, device=device), reduction="sum")
        return count_items(batch_samples, device)

    def weighted_compute_loss(model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
        import torch
        from deepspeed.utils import groups

        if not model.training:
            return compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        tokens = (inputs["shift_labels"] != -100).sum()
        with _group_safe_all_gather():
            result = compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        # (no public accessor of the SP group in DeepSpeed; transformers' SP loss uses the same)
        torch.distributed.all_reduce(tokens, group=groups._get_sequence_parallel_group())
        weight = tokens * data_parallel * trainer.current_gradient_accumulation_steps / step_tokens[0].clamp(min=1)
        if return_outputs:
            return _scale_gradient(result[0] * weight, gradient_scale), result[1]
        return _scale_gradient(result * weight, gradient_scale)

    use_packed_attention(unwrapped(trainer.model))
    pad_to_group(trainer.accelerator, trainer.data_collator.pad_token_id)
    # The Trainer's private hook is where it counts a step's loss tokens; there is no public one.
    trainer._get_num_items_in_batch = count_step_tokens
    trainer.compute_loss = weighted_compute_loss
    trainer.add_callback(_sequence_parallel_check(pc.sp_size))
    if not recipe.train_setting("ignore_data_skip"):
        trainer.add_callback(_skip_trained_batches())
    return True


def _sequence_parallel_check(size: int) -> Any:
    """A callback that stops the run at its start unless DeepSpeed really formed sequence-parallel groups of
    `size` (the groups exist only once the trainer has prepared the model); otherwise every process would train
    on its own samples, a data-parallel run labelled sequence-parallel."""
    from transformers import TrainerCallback

    class SequenceParallelCheck(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            from deepspeed.utils import groups

            # DeepSpeed's groups module has no public accessor for the SP group; transformers uses this one.
            got = groups._get_sequence_parallel_world_size()
            if got != size:
                raise UserError(
                    f"sequence_parallel: {size} was asked for but DeepSpeed formed groups of {got}; refusing a run "
                    "that would not share samples as configured"
                )

    return SequenceParallelCheck()


def _skip_trained_batches() -> Any:
    """A callback that, on resume, draws from the SP dataloader the micro-batches the checkpoint's steps of this
    epoch used, counted as the trainer counts them (`_init_training_state`, the adapter's length)."""
    from transformers import TrainerCallback

    class SkipTrainedBatches(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None,
                           **kwargs: Any) -> None:
            if not state.global_step or train_dataloader is None:
                return
            length, accumulation = len(train_dataloader), args.gradient_accumulation_steps
            per_epoch = max(length // accumulation + int(length % accumulation > 0), 1)
            for _ in range((state.global_step % per_epoch) * accumulation):
                next(train_dataloader)

    return SkipTrainedBatches()


def _scale_gradient(loss: Any, scale: float) -> Any:
    """`loss` with the same value, whose gradient is multiplied by `scale`."""
    return loss * scale + (loss * (1.0 - scale)).detach()


@contextlib.contextmanager
def _group_safe_all_gather() -> Iterator[None]:
    """Within this block, `torch.distributed.nn.functional.all_gather` is a differentiable all-gather whose
    backward all-reduces the gradients (see `install`)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    class AllGather(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, group: Any, tensor: Any) -> Any:
            ctx.group = group
            out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group=group))]
            dist.all_gather(out, tensor.contiguous(), group=group)
            return tuple(out)

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            # Rank r's input fed output r on every rank: its gradient is the sum over ranks of grads[r].
            summed = torch.stack(grads)
            dist.all_reduce(summed, group=ctx.group)
            return None, summed[dist.get_rank(group=ctx.group)]

    original = dist_fn.all_gather
    dist_fn.all_gather = lambda tensor, group=dist.group.WORLD: AllGather.apply(group, tensor)
    try:
        yield
    finally:
        dist_fn.all_gather = original
