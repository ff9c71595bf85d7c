"""Mixture-of-experts facts read off a built model: which parameters are experts, how many of them one token
uses, and which module is the sparse block.

Compute follows the *active* parameters (top-k of n routed experts, plus everything dense and any shared
expert), memory the total: the planner prints both and the MFU counts the first. transformers 5 holds the
routed experts of every MoE family as one `experts` module (fused [n_experts, ...] tensors), whatever the hub
layout on disk; older layouts with an `experts` ModuleList count the same way.
"""

from __future__ import annotations

from typing import Any


def experts_per_token(config: Any) -> tuple[int, int] | None:
    """(k, n): routed experts each token uses, of how many; None for a dense model."""
    text = config.get_text_config()
    k = getattr(text, "num_experts_per_tok", None) or getattr(text, "experts_per_token", None)
    n = next((getattr(text, a) for a in ("num_local_experts", "num_experts", "n_routed_experts")
              if isinstance(getattr(text, a, None), int)), None)  # fmt: skip
    return (k, n) if isinstance(k, int) and n else None


def expert_parameters(model: Any) -> list[tuple[Any, float]]:
    """(parameter, share of it one token uses) for every routed-expert parameter of `model`."""
    kn = experts_per_token(model.config)
    if kn is None:
        return []
    share = kn[0] / kn[1]
    return [(p, share) for name, mod in model.named_modules() if name.rsplit(".", 1)[-1] == "experts"
            for p in mod.parameters()]  # fmt: skip


def numel(p: Any) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it away (`ds_numel`)."""
    return getattr(p, "ds_numel", None) or p.numel()


def active_parameters(model: Any) -> int:
    """Parameters one token goes through: the total less the routed experts it is not sent to."""
    total = sum(numel(p) for p in model.parameters())
    return total - round(sum(numel(p) * (1 - share) for p, share in expert_parameters(model)))


def sparse_block_classes(model: Any) -> list[type]:
    """Classes of the sparse MoE blocks (the parents of `experts`): ZeRO-3 must gather such a block whole
    (`deepspeed.utils.set_z3_leaf_modules`), since ranks that route their tokens to different experts would
    otherwise wait for each other's gathers of the experts they skip."""
    names = {name.rsplit(".", 1)[0] for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == "experts"}
    modules = dict(model.named_modules())
    return sorted({type(modules[n]) for n in names if n in modules}, key=lambda c: c.__name__)
