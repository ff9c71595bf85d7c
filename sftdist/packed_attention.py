"""Padding-free packed rows on a GPU without flash-attn: torch's own varlen kernel, or rows of whole samples.

Gap filled: trl's padding-free collator joins a micro-batch into one flat row (4 x 4096 = 16,384 tokens for the
selftest's 1b run) and gives each sample its own position_ids. flash-attn splits that row for free; without it
(the GPU kit and the target image have none) `auto` used to resolve to sdpa, transformers built a dense
(batch x max_length)^2 mask from the position_ids (256 MiB at 16k tokens, about 8 GiB of bias kept for the backward
over 16 layers), sdpa repeated K/V for GQA, and attention FLOPs grew with the square of the whole row. No
fine-tuning framework covers this without the flash-attn package.

Two paths: this module's, picked by `model.resolve_attention` (auto) where it can run, and packed_rows.py's:
1. `NAME`: an attention function registered with transformers' AttentionInterface (as seqpar_attention's are)
   that calls `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA) with `cu_seqlens` derived from the
   position_ids by transformers' own rule (a sample starts where the position does not follow on; every row of
   the batch starts one too). Custom names get no mask from transformers (masking_utils skips names it has no
   mask function for), so nothing of size row^2 is ever built. GQA goes to the kernel (`enable_gqa`) or K/V are
   repeated where that torch lacks it; a sliding window becomes the kernel's left window; fp32 inputs are run
   in bf16 (fp16 without bf16), the kernel's only dtypes, and the output cast back.
2. Otherwise (sdpa/eager on a GPU), packed_rows.py runs the flat row as rows of whole samples, so that no
   attention square is larger than max_length^2.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from sftdist.errors import UserError

NAME = "sftdist_varlen"
HALF = ("bfloat16", "float16")


@functools.cache
def kernel() -> Callable[..., Any] | None:
    """torch's varlen flash attention, where this torch has it and a GPU is visible; else None."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def register(fn: Callable[..., Any] | None = None, name: str = NAME) -> str:
    """Register the varlen attention (around `fn`, default torch's kernel) under `name`; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, attention_function(fn or kernel()))
    return name


def cu_seqlens(position_ids: Any) -> tuple[Any, int]:
    """(cumulative sample starts over the flattened [batch, tokens] rows as int32, longest sample). A sample starts
    where its position does not follow on from the previous token's, and at the start of every row: a sample cut
    at a row's end goes on as a new one in the next row, as transformers' flash path treats it."""
    import torch

    pos = position_ids
    start = torch.ones(pos.shape, dtype=torch.bool, device=pos.device)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    starts = start.flatten().nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def attention_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A transformers attention function over `fn`, which has varlen_attn's contract: q/k/v [tokens, heads, dim],
    cu_seq_q/k, max_q/k, then (where its signature has them) is_causal, window_size, enable_gqa, scale."""
    params = inspect.signature(fn).parameters

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
                  dropout: float = 0.0, sliding_window: int | None = None, position_ids: Any = None,
                  **kwargs: Any) -> tuple[Any, None]:
        import torch

        b, hq, t, d = query.shape
        if position_ids is None:
            raise UserError(f"attention {NAME}: the model passed no position_ids, so packed samples cannot be told "
                            "apart; use model.attn_implementation: sdpa")
        if dropout or kwargs.get("softcap") is not None:
            raise UserError(f"attention {NAME}: attention dropout and logit soft-capping are not supported by torch's "
                            "varlen kernel; use model.attn_implementation: sdpa or eager")
        cu, longest = cu_seqlens(position_ids.expand(b, -1))
        q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
        hkv = k.shape[1]
        extra: dict[str, Any] = {}
        if hkv != hq:
            if "enable_gqa" in params:
                extra["enable_gqa"] = True
            else:
                k, v = (x.repeat_interleave(hq // hkv, dim=1) for x in (k, v))
        if "is_causal" in params:
            extra["is_causal"] = True
        if "window_size" in params:
            extra["window_size"] = (sliding_window - 1 if sliding_window else -1, 0)
        elif sliding_window and longest > sliding_window:
            raise UserError(f"attention {NAME}: a sample of {longest} tokens is longer than the model's sliding window "
                            f"({sliding_window}) and this torch's varlen kernel has no window; use data.max_length <= "
                            f"{sliding_window} or model.attn_implementation: sdpa")
        if "scale" in params:
            extra["scale"] = scaling
        elif scaling is not None and abs(scaling - d**-0.5) > 1e-6:
            raise UserError(f"attention {NAME}: the model scales attention by {scaling}, which this torch's varlen "
                            "kernel cannot; use model.attn_implementation: sdpa")
        wanted = q.dtype
        if str(wanted).removeprefix("torch.") not in HALF:  # the kernel computes in bf16/fp16 only
            half = torch.bfloat16 if not q.is_cuda or torch.cuda.is_bf16_supported() else torch.float16
            q, k, v = (x.to(half) for x in (q, k, v))
        out = fn(q, k, v, cu, cu, longest, longest, **extra)
        return out.to(wanted).reshape(b, t, hq, d), None

    return attention
