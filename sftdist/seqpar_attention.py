"""Attention that keeps packed samples apart when DeepSpeed's Ulysses shares each row between N processes.

Gap filled (DeepSpeed 0.19.8 `UlyssesSPAttentionHF`, measured in README "Long samples"): after its all-to-all
each rank holds the whole row for 1/N of the heads, and Ulysses then drops every tensor attention mask (the
model built it for the rank's 1/N of the tokens), so under sdpa the row is attended causally as one sequence
and packed samples attend to each other; eager it refuses outright. What it does carry is the row's
position_ids, all-gathered in every layer, and they hold the sample boundaries: a sample starts where the
position does not follow on (transformers' own rule, `find_packed_sequence_indices`).

Under sequence parallelism the model's attention is therefore one of ours, registered with transformers'
AttentionInterface (`packed_name`), and Ulysses wraps it as its core attention: the model's own sdpa or eager
run on each sample alone, causal inside it. That is the block-diagonal causal mask, applied one diagonal block
at a time: no row x row mask is built, so attention memory stays what one sample needs.

Flash attention keeps its own name: with the mask gone and the gathered position_ids in its kwargs,
transformers' flash path (`_flash_attention_forward`) derives the varlen `cu_seqlens` from those same
position_ids, by the same rule. That path cannot run here (no GPU); tests/test_sequence_parallel.py checks
that the boundaries it would derive are the ones `sample_spans` gives.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from sftdist.errors import UserError

# The implementations this module runs per sample, and the name each is registered under.
PACKED_NAMES = {"sdpa": "sftdist_packed_sdpa", "eager": "sftdist_packed_eager"}


def packed_name(impl: str) -> str:
    """The attention implementation a model with `impl` runs under sequence parallelism (flash keeps its own)."""
    return PACKED_NAMES.get(impl, impl)


def sample_spans(position_ids: Any) -> list[tuple[int, int]]:
    """[start, end) of each sample in one row of position_ids. A run of one-token samples (padding: each pad
    token has position 0) is one span: none of them carries loss, and no other token attends to them."""
    import torch

    n = position_ids.numel()
    start = torch.ones(n, dtype=torch.bool, device=position_ids.device)
    start[1:] = position_ids[1:] != position_ids[:-1] + 1
    lone = start.clone()  # a start whose next token starts again (or ends the row): a one-token sample
    lone[:-1] &= start[1:]
    after_lone = torch.zeros_like(lone)
    after_lone[1:] = lone[:-1]
    edges = (start & ~(lone & after_lone)).nonzero().flatten().tolist() + [n]
    return list(zip(edges, edges[1:]))


def use_packed_attention(model: Any) -> str:
    """Register the per-sample attention for `model`'s implementation and switch the model to it; returns the
    name the model now uses (what Ulysses must wrap). Flash attention is left as it is."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    impl = model.config._attn_implementation  # transformers' own record of the implementation
    name = packed_name(impl)
    if name == impl:
        return impl
    inner = sdpa_attention_forward if impl == "sdpa" else _model_eager
    AttentionInterface.register(name, _per_sample(inner, causal_mask=impl == "eager"))
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:  # transformers only warns for models it cannot switch
        raise UserError(f"sequence_parallel: {type(model).__name__} does not take its attention from transformers' "
                        "AttentionInterface, so its packed samples cannot be kept apart; use another model or "
                        "sequence_parallel: 1")
    return name


def _model_eager(module: Any, *args: Any, **kwargs: Any) -> Any:
    """The model's own eager attention. transformers keeps eager per model (each modeling file's
    `eager_attention_forward`, the default its attention layers fall back to), with no registry entry."""
    return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)


def _per_sample(inner: Callable[..., Any], causal_mask: bool) -> Callable[..., Any]:
    """An attention function that runs `inner` on each sample of each row, causal inside the sample: with no
    mask (sdpa is then causal) or, for eager, which needs one, with an additive causal mask of the sample."""

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, position_ids: Any,
                  **kwargs: Any) -> tuple[Any, None]:
        import torch

        window = kwargs.get("sliding_window")
        # The mask is never read: Ulysses drops it, and the position_ids (which transformers always passes, and
        # sometimes as one row for the whole batch) carry the same boundaries: trl's collator pads on the right and
        # gives each pad token position 0.
        position_ids = position_ids.expand(query.shape[0], -1)
        rows = []
        for r in range(query.shape[0]):
            parts = []
            for a, b in sample_spans(position_ids[r]):
                if window and b - a > window:  # a sliding window would need its own mask: refused, not ignored
                    raise UserError(f"sequence_parallel: a sample of {b - a} tokens is longer than the model's "
                                    f"sliding attention window ({window}); use data.max_length <= {window} or "
                                    "sequence_parallel: 1")
                mask = None
                if causal_mask:
                    mask = torch.full((b - a, b - a), torch.finfo(query.dtype).min, dtype=query.dtype,
                                      device=query.device).triu(1)[None, None]
                out, _ = inner(module, query[r:r + 1, :, a:b], key[r:r + 1, :, a:b], value[r:r + 1, :, a:b], mask,
                               **kwargs)
                parts.append(out)
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0), None  # [batch, tokens, heads, head_dim], as transformers' attentions return

    return attention
