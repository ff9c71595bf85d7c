"""A diverged run never saves a non-finite model (divergence.py), through `sftdist train`: a NaN loss stops
the run at its step with one line and nothing saved; weights that turn non-finite while the loss stays finite
are refused at the checkpoint; the loss is logged as it is (the Trainer's filter would log it as 0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from test_errors import GOOD, jsonl, recipe


def poisoned(tiny_model: Path, dest: Path, tensor: str, rows: slice | None = None) -> Path:
    """A copy of the tiny model with NaN in `tensor` (in `rows` of it only, when given)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_model, dest)
    weights = load_file(dest / "model.safetensors")
    with torch.no_grad():
        weights[tensor][rows if rows is not None else slice(None)] = float("nan")
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def run_and_refuse(d: Path, model: Path) -> str:
    args = ["train", recipe(d, model, [{"path": str(jsonl(d / "data.jsonl", [GOOD] * 4))}],
                            train={"max_steps": 3, "save_steps": 1, "report_to": []})]
    proc = run_cli(*args)
    # The Trainer's progress bar (closed before the error) aside, one line.
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "/3 [" not in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    run = d / "run"
    assert not list(run.glob("checkpoint-*")) and not (run / "final").exists(), sorted(p.name for p in run.iterdir())
    return lines[0]


def test_a_nan_loss_stops_the_run_at_its_step_with_nothing_saved(tmp_path: Path, tiny_model: Path):
    model = poisoned(tiny_model, tmp_path / "model", "model.norm.weight")
    line = run_and_refuse(tmp_path, model)
    assert line.startswith("error: training diverged at step 1: the loss is nan and the gradient norm is nan"), line
    assert f"nothing of step 1 was saved, so the newest checkpoint in {tmp_path / 'run'} holds finite weights" in line
    assert line.endswith("lower train.learning_rate (now 2e-05) or find the cause, then start over with --no-resume")


def test_non_finite_weights_are_never_checkpointed(tmp_path: Path, tiny_model: Path):
    """NaN in rows of the input embedding that the data never uses: the loss and the gradients stay finite,
    but the weights are not, so no checkpoint is written with them."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tiny_model))
    model = poisoned(tiny_model, tmp_path / "model", "model.embed_tokens.weight", slice(vocab - 2, vocab))
    line = run_and_refuse(tmp_path, model)
    assert line.startswith("error: training diverged by step 1: the weights are not finite "
                           f"(model.embed_tokens.weight), so {tmp_path / 'run' / 'checkpoint-1'} was not written"), line


def test_the_loss_is_logged_as_it_is(tmp_path: Path, tiny_model: Path):
    """The SFTConfig `sftdist train` builds turns off the Trainer's NaN filter (which logs a NaN loss as the
    mean of the earlier ones, 0 on the first step)."""
    from sftdist.recipe import load_recipe
    from sftdist.train import build_sft_config

    path = Path(recipe(tmp_path, tiny_model, [{"path": str(jsonl(tmp_path / "data.jsonl", [GOOD]))}]))
    assert build_sft_config(load_recipe(path)).logging_nan_inf_filter is False
