"""The distribution strategies: their names, their speed order, and the configs that implement them.

One table for the launcher (which config to pass to `accelerate launch`), the planner (which
strategies to estimate, fastest first) and the run itself (the ZeRO stage of a DeepSpeed config).
"""

from __future__ import annotations

import json
from pathlib import Path

from sftdist.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# strategy -> (accelerate config, DeepSpeed config or None), fastest first. ddp: one all-reduce of
# the gradients (2 x model bytes per step). zero1/zero2: the same volume split into reduce-scatter +
# all-gather, plus bucketing and a sharded optimizer step. fsdp2/zero3: parameters are all-gathered
# again in forward and backward (1.5x the volume, ZeRO paper sec. 7); FSDP2 ranks before ZeRO-3 for
# its per-parameter sharding without DeepSpeed's hooks. zero3-offload moves parameters over PCIe
# every step and runs Adam on the CPU: the slowest. `single` is one process.
STRATEGIES: dict[str, tuple[str, str | None]] = {
    "single": ("single.yaml", None),
    "ddp": ("ddp.yaml", None),
    "zero1": ("zero1.yaml", "zero1.json"),
    "zero2": ("zero2.yaml", "zero2.json"),
    "fsdp2": ("fsdp2.yaml", None),
    "zero3": ("zero3.yaml", "zero3.json"),
    "zero3-offload": ("zero3_offload.yaml", "zero3_offload.json"),
}
DEEPSPEED = tuple(name for name, (_, ds) in STRATEGIES.items() if ds)


def config_paths(strategy: str) -> tuple[Path, Path | None]:
    """The accelerate config (and DeepSpeed JSON) of a shipped strategy, or a user's accelerate config path."""
    if strategy in STRATEGIES:
        acc, ds = STRATEGIES[strategy]
        return (CONFIG_DIR / "accelerate" / acc).resolve(), (CONFIG_DIR / "deepspeed" / ds).resolve() if ds else None
    path = Path(strategy)
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise UserError(f"--strategy {strategy}: accelerate config file not found")
        return path.resolve(), None
    raise UserError(
        f"--strategy {strategy}: unknown strategy; expected one of {', '.join(STRATEGIES)} "
        "or the path of an accelerate config (.yaml)"
    )


def deepspeed_json(path: Path) -> dict:
    """A DeepSpeed config file as a mapping, or a one-line error naming it."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raw = None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a readable DeepSpeed JSON config (expected a JSON object)")
    return raw


def deepspeed_stage(path: Path) -> int:
    """The ZeRO stage a DeepSpeed config file asks for (DeepSpeed's default: 0)."""
    zero = deepspeed_json(path).get("zero_optimization") or {}
    try:
        return int(zero.get("stage", 0))
    except (TypeError, ValueError):
        raise UserError(f"{path}: zero_optimization.stage is {zero.get('stage')!r}; expected 0, 1, 2 or 3") from None
