"""`sftdist env`: what a bug report needs to know about the machine, in one block to paste.

Versions come from the installed distributions' metadata (nothing but torch is imported, for its CUDA
and GPUs); what `--strategy auto` would choose comes from the launcher's own probe
(`launcher.auto_strategy`), so this report and `sftdist launch --strategy auto` cannot disagree.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

from sftdist.errors import UserError

# Distribution names as pip knows them, in the order of the report.
PACKAGES = ("sftdist", "torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "bitsandbytes",
            "flash-attn", "datasets")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def report(recipe_path: str | None = None, overrides: tuple[str, ...] = (), num_processes: int | None = None,
           num_machines: int = 1) -> list[str]:
    """The lines of `sftdist env`: platform, package versions, torch's CUDA, the GPUs, the auto strategy."""
    import torch

    from sftdist.launcher import auto_strategy, visible_gpus

    lines = [f"python: {sys.version.split()[0]} ({platform.platform()})"]
    lines += [f"{name}: {_version(name)}" for name in PACKAGES]
    cuda = torch.version.cuda
    lines.append(f"torch CUDA: {cuda or 'none (CPU build)'}; available: {'yes' if torch.cuda.is_available() else 'no'}")
    gpus = visible_gpus()
    if gpus:
        for i in range(gpus):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("gpus: none visible")
    if recipe_path is None:
        lines.append("strategy auto: pass a recipe (sftdist env RECIPE) to see what `launch --strategy auto` chooses")
        return lines
    from sftdist.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)  # a mistake in the recipe is the command's one error line
    try:
        strategy, processes, why = auto_strategy(recipe, gpus, num_processes, num_machines, None)
    except UserError as e:  # e.g. no GPU and no --num-processes, or nothing fits: part of the report
        lines.append(f"strategy auto: cannot choose: {e}")
    else:
        lines.append(f"strategy auto: {strategy} x {processes} process(es) per machine ({why})")
    return lines
