"""Real 2-process `sftdist launch` runs on CPU, shared by the strategy tests (test_distributed), the
checkpoint tests under each strategy (test_distributed_checkpoints) and the resumes at another number
of processes (test_resume_world_size): each (method, strategy) trains once per test session.

Every run trains the same recipe with `global_batch_size: 4` (sequences per optimizer step), and each
derives its accumulation: `single` is 1 process x batch 2 x accumulation 2; `ddp` is 2 processes x
batch 1 x accumulation 2 (so the loss normalisation across processes and accumulation steps is
compared with one process); the others are 2 processes x batch 2. Each saves a
checkpoint at steps 2 and 4 (SAVE_STEPS), so that resume and export are tested on what the strategy
really writes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

STEPS = 4
SAVE_STEPS = 2
GLOBAL_BATCH = 4
# How far a run may be from the same run in one process (the reasons are in test_distributed's docstring).
LOSS_ATOL = 1e-4
WEIGHT_ATOL = 1e-4

_runs: dict[tuple[str, str], Path] = {}


def write_recipe(path: Path, model: Path, data: Path, method: str, output_dir: Path, batch: int = 2) -> None:
    recipe = {
        "model": {"name_or_path": str(model)},
        "method": method,
        # Each launch derives its accumulation: 1 process x batch 2 -> 2; 2 x 1 -> 2; 2 x 2 -> 1.
        "global_batch_size": GLOBAL_BATCH,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [{"path": str(data)}], "max_length": 64},
        "train": {
            "max_steps": STEPS,
            "save_steps": SAVE_STEPS,
            "per_device_train_batch_size": batch,
            "learning_rate": 5e-3 if method != "full" else 1e-3,
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
            "report_to": [],
            "seed": 7,
        },
        "output_dir": str(output_dir),
    }
    path.write_text(yaml.safe_dump(recipe))


def launch_args(recipe: Path, strategy: str) -> list[str]:
    """`sftdist` arguments that launch `recipe` with `strategy`: 2 processes, or 1 for `single`."""
    procs = [] if strategy == "single" else ["--num-processes", "2"]
    return ["launch", str(recipe), "--strategy", strategy, *procs]


def launch(recipe: Path, strategy: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = run_cli(*launch_args(recipe, strategy), env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, data: Path, method: str, strategy: str) -> Path:
    """Run (once per session) `sftdist launch` for method x strategy and return its output_dir."""
    key = (method, strategy)
    if key not in _runs:
        root = tmp_path_factory.mktemp(f"{method}-{strategy}")
        batch = 1 if strategy == "ddp" else 2
        write_recipe(root / "recipe.yaml", tiny_model, data, method, root / "run", batch)
        # A data cache of its own, so that each launch builds its entry (test_cache reads the log).
        proc = launch(root / "recipe.yaml", strategy, env={"SFTDIST_CACHE": str(root / "cache")})
        (root / "launch.log").write_text(proc.stdout)
        _runs[key] = root / "run"
    return _runs[key]


def history(run: Path) -> tuple[list[float], list[float]]:
    """Per-step losses and tokens per step (trl's num_tokens is gathered over all processes)."""
    logs = [e for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert [e["step"] for e in logs] == list(range(1, STEPS + 1))
    tokens = [e["num_tokens"] for e in logs]
    return [e["loss"] for e in logs], [b - a for a, b in zip([0.0, *tokens], tokens)]


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    final = run / "final"
    file = final / "adapter_model.safetensors"
    return load_file(file if file.is_file() else final / "model.safetensors")
