"""Packed rows on a GPU under sdpa/eager: the decoder runs trl's flat padding-free row as rows of whole samples.

Gap filled: without flash attention or torch's varlen kernel (packed_attention.py), transformers attends a flat
packed row of batch x max_length tokens as one square with a block-diagonal mask (256 MiB of mask and ~8 GiB of
bias kept for the backward at 16k tokens over 16 layers). Here the decoder runs it as rows of whole samples of at
most max_length tokens (`fast_head.row_spans`, the CPU path's rule) and puts the hidden states back in the flat
order, so no attention square is larger than max_length^2 and the head (trl's fused one on a GPU) is unchanged.
On CPU fast_head.py does the same regrouping together with its own loss head.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any


def install(trainer: Any, row_length: int | None) -> str | None:
    """On a GPU, make sure no attention square exceeds `row_length`^2 (data.max_length): nothing to do for flash
    attention or torch's varlen kernel; sdpa/eager get the decoder's regrouping. Returns "regrouped" or None."""
    from sftdist.fast_head import _MASKED_ATTENTION
    from sftdist.model import unwrapped

    model = unwrapped(trainer.model)
    if trainer.args.device.type == "cpu" or not getattr(trainer.args, "padding_free", False) or not row_length:
        return None  # CPU: fast_head regroups, and scores the loss positions only
    if model.config._attn_implementation not in _MASKED_ATTENTION:
        return None
    decoder = model.base_model
    decoder.forward = types.MethodType(regrouped_forward(decoder.forward, row_length), decoder)
    decoder.sftdist_rows_of_whole_samples = row_length  # what the selftest reports as the path that ran
    return "regrouped"


def regrouped_forward(forward: Callable[..., Any], row_length: int) -> Callable[..., Any]:
    """The decoder's `forward`, running a flat padding-free row (batch 1, no attention mask) as rows of whole samples
    of at most `row_length` tokens, and returning the last hidden states in the flat order."""

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        from sftdist.fast_head import VARLEN_KEYS, regroup, row_spans

        ids, pos = kwargs.get("input_ids"), kwargs.get("position_ids")
        flat = not args and ids is not None and pos is not None and ids.shape[0] == 1 and kwargs.get(
            "attention_mask") is None and kwargs.get("inputs_embeds") is None
        spans = row_spans(pos, row_length) if flat else []
        if len(spans) < 2:
            return forward(*args, **kwargs)
        for key in VARLEN_KEYS:
            kwargs.pop(key, None)
        rows_ids, rows_pos, back = regroup(ids, pos, spans)
        out = forward(**{**kwargs, "input_ids": rows_ids, "position_ids": rows_pos, "use_cache": False})
        hidden = out.last_hidden_state
        out.last_hidden_state = hidden.reshape(-1, hidden.shape[-1])[back].unsqueeze(0)
        return out

    return run
