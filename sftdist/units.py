"""Sizes as users write them ('80GiB', '500MB') and as sftdist prints them.

A leaf: the CLI, the planner, preflight and the shard writer all read sizes, and none of them
should have to import the others for it.
"""

from __future__ import annotations

import re

from sftdist.errors import UserError

GiB = 1 << 30
# GB is 10^9 and GiB 2^30, as transformers' `save_pretrained` and nvidia-smi (MiB) count them.
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}  # fmt: skip


def parse_size(text: str, what: str) -> int:
    """'80GiB', '24GB', '81920MiB', '1.5GB' -> a positive number of bytes, or a UserError naming `what`."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise UserError(f"{what} {text!r}: expected a size such as 500MB, 24GB or 80GiB")
    size = int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])
    if size <= 0:
        raise UserError(f"{what} {text!r}: expected a positive size")
    return size


def gib(x: float) -> str:
    """Bytes as GiB with one decimal, the unit the planner's tables use."""
    return f"{x / GiB:.1f}"
