"""trl's fused LM-head forward, done the CPU way: attention within packs, logits only where the loss is.

Gaps filled (trl 1.16, measured in bench/README.md): `SFTTrainer` patches the model's forward with a chunked fused
LM head (`add_fused_lm_head`). With Triton (CUDA/XPU) it scores only positions whose label is not -100; on CPU it
scores every position, masks afterwards, folds each vocabulary tile with a dozen elementwise passes and recomputes
the projection in the backward. And padding-free batches arrive flattened into one row, which varlen flash
attention splits for free, while sdpa/eager attend over the whole (batch x max_length)^2 square, masked.

On CPU this forward (1) runs the backbone on rows of at most `max_length` tokens, each holding whole samples, then
puts the hidden states back in the flat order, and (2) runs the model's own output layer on the loss positions
only and takes one log-softmax of those logits, like the model's unfused forward. Attention never crossed samples
and masked positions never reached the loss, so the loss, its gradients and trl's metrics are unchanged.
"""

from __future__ import annotations

import types
from typing import Any

# One [loss positions, vocab] float32 tensor is kept for the backward (about three at the peak); a batch with more
# goes through trl's tiled head, which never holds the logits.
MAX_LOGITS_BYTES = 1 << 30

# Config attributes that change the logits after the output layer; trl's head applies them, this one does not.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")
# Attention that separates packed samples with a mask over the whole row (varlen kernels need no regrouping).
_MASKED_ATTENTION = ("sdpa", "eager")
# Collator outputs for varlen kernels; they describe the flat row, so they are dropped when it is regrouped (here) or
# split between sequence-parallel ranks (seqpar_batches).
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def supported(model: Any) -> bool:
    """True for causal LMs whose logits are the output layer's plain output (Llama, Qwen, Mistral, GPT-2, ...)."""
    cfg = model.config.get_text_config()
    if any(getattr(cfg, a, None) is not None for a in _LOGIT_TRANSFORMS):
        return False
    head = model.get_output_embeddings()
    return not getattr(cfg, "output_router_logits", False) and isinstance(getattr(head, "out_features", None), int)


def install(trainer: Any) -> bool:
    """Give `trainer`'s model (already patched by trl's SFTTrainer) this forward when it trains on CPU; True if so."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from sftdist.model import unwrapped

    model = unwrapped(trainer.model)
    # Not installed under ZeRO-3, where it has not been verified.
    if trainer.args.device.type != "cpu" or is_deepspeed_zero3_enabled() or not supported(model):
        return False
    row_length = trainer.args.max_length or 1024
    model.forward = types.MethodType(_make_forward(model.forward, row_length), model)
    return True


def _make_forward(trl_forward: Any, row_length: int) -> Any:
    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if fused_lm_head and not args:
            targets = labels[:, 1:] if shift_labels is None else shift_labels
            vocab = self.get_output_embeddings().out_features  # not weight.shape: ZeRO-3 leaves it empty here
            if int((targets != -100).sum()) * vocab * 4 <= MAX_LOGITS_BYTES:
                hidden = backbone(self, row_length, **kwargs)
                return loss_positions_head(self, hidden[:, :-1] if shift_labels is None else hidden, targets,
                                           num_items_in_batch)
        # trl's fused forward: generation (`fused_lm_head=False`), or a batch whose logits would be too large
        return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                           num_items_in_batch=num_items_in_batch, **kwargs)

    return forward


def row_spans(position_ids: Any, row_length: int) -> list[tuple[int, int]]:
    """Split one flat padding-free row into consecutive spans of whole samples, each at most `row_length` tokens
    (or the longest sample). Samples start where the position does not follow on, transformers' own rule."""
    import torch

    pos = position_ids[0]
    # Prepending pos[0] makes the first token a start too (a flat row of one sample has no other).
    starts = (torch.diff(pos, prepend=pos[:1]) != 1).nonzero().flatten().tolist() + [pos.numel()]
    cap = max(row_length, max(b - a for a, b in zip(starts, starts[1:])))
    spans, begin = [], 0
    for a, b in zip(starts, starts[1:]):
        if b - begin > cap:
            spans.append((begin, a))
            begin = a
    spans.append((begin, pos.numel()))
    return spans


def backbone(model: Any, row_length: int, **kwargs: Any) -> Any:
    """The backbone's last hidden states, [batch, length, hidden], with a flat packed row run as several rows."""
    kwargs["use_cache"] = False  # the cache would let packed samples attend to each other
    ids, pos = kwargs.get("input_ids"), kwargs.get("position_ids")
    flat = (
        ids is not None and pos is not None and ids.shape[0] == 1 and kwargs.get("attention_mask") is None
        and model.config._attn_implementation in _MASKED_ATTENTION  # transformers' own record of the implementation
    )
    spans = row_spans(pos, row_length) if flat else []
    if len(spans) < 2:
        return model.base_model(**kwargs).last_hidden_state
    for key in VARLEN_KEYS:
        kwargs.pop(key, None)
    rows_ids, rows_pos, back = regroup(ids, pos, spans)
    hidden = model.base_model(**{**kwargs, "input_ids": rows_ids, "position_ids": rows_pos}).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[back].unsqueeze(0)


def regroup(ids: Any, pos: Any, spans: list[tuple[int, int]]) -> tuple[Any, Any, Any]:
    """The flat row's `spans` (row_spans) as rows of their own, padded to the longest, and the index that takes
    the rows' flattened outputs back to the flat row's order."""
    import torch

    width = max(b - a for a, b in spans)
    rows_ids = ids.new_zeros(len(spans), width)
    rows_pos = pos.new_zeros(len(spans), width)  # padding: position 0 each, so each pad token is its own sample
    for r, (a, b) in enumerate(spans):
        rows_ids[r, : b - a] = ids[0, a:b]
        rows_pos[r, : b - a] = pos[0, a:b]
    back = torch.cat([torch.arange(b - a, device=ids.device) + r * width for r, (a, b) in enumerate(spans)])
    return rows_ids, rows_pos, back


def loss_positions_head(model: Any, hidden: Any, targets: Any, num_items_in_batch: Any) -> Any:
    """trl's `FusedCausalLMOutput` (loss, per-token log-probs, entropy, top-1) from the loss positions only;
    `hidden[:, i]` predicts `targets[:, i]`."""
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    mask = targets != -100
    wanted = targets[mask]
    logits = model.get_output_embeddings()(hidden[mask]).float()
    is_top1 = logits.argmax(-1) == wanted  # argmax takes the first maximum, like trl's tie rule
    log_p = logits.log_softmax(-1)
    del logits  # the backward keeps only log_p: one [positions, vocab] tensor less at the peak
    picked = log_p.gather(-1, wanted.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():  # a metric: trl's SFT loss reads the entropy detached
        entropy = -log_p.exp().mul_(log_p).sum(-1)
    # masked_scatter keeps an all-masked batch connected to the graph (a differentiable zero), as trl does.
    log_probs, entropy, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in (picked, entropy, is_top1))
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask
    )
