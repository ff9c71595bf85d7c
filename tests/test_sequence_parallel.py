"""Sequence parallelism (`sequence_parallel: 2`, DeepSpeed Ulysses) on CPU: processes sharing every sample learn
what one process learns from the whole samples, and runs that cannot work are refused before they start.

The gate runs real `sftdist launch` processes on long samples (the answer copies a 40-80 word list, so about half
of each sample's tokens carry loss and the two halves of a sample hold different numbers of them) against
`sftdist train` in one process with gradient accumulation 2 (batch 2, so 4 samples per optimizer step):
- zero2, 2 processes, sequence_parallel 2 (one data-parallel group), accumulation 2;
- zero3, 4 processes, sequence_parallel 2 x data-parallel 2, accumulation 1.
Samples are read in order (`train_sampling_strategy: sequential`). With 4 processes each SP group takes the
batches of its own ranks one after the other, so a step holds batches 0 and 2, then 1 and 3, ...; the single run
reads the same batches in that order (`interleaved`), and so does the zero2 run.
Plain SGD without clipping: its update is proportional to the gradient, so a wrong gradient scale shows in the
weights (Adam and clipping would hide it), and grad_norm is compared as well. Tolerances are launched.py's, for
the same reason (fp32 sums in a different order); measured: losses <= 1e-6, weights <= 1.2e-7.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import copy_run, run_cli
from launched import LOSS_ATOL, STEPS, WEIGHT_ATOL, final_weights, history
from sftdist.errors import UserError
from sftdist.launcher import build_launch
from sftdist.recipe import load_recipe

WORDS = "apple kite owl rain goat door ink cat milk dog hat moon bird lamp nest".split()
# strategy -> (processes, gradient accumulation, data file, expected (sequence_parallel, data_parallel))
RUNS = {
    "single": (1, 2, "interleaved", (1, 1)),
    "zero2": (2, 2, "interleaved", (2, 1)),
    "zero3": (4, 1, "rows", (2, 2)),
}
_runs: dict[str, Path] = {}


@pytest.fixture(scope="session")
def long_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 samples of 200-330 tokens (STEPS steps x 4), as `rows.jsonl`, and as `interleaved.jsonl` with the
    pairs (batches of 2) in the order 0 2 1 3 4 6 5 7; returns the folder."""
    rng = random.Random(0)
    rows = []
    for _ in range(16):
        words = "\n".join(rng.choice(WORDS) for _ in range(rng.randint(40, 80)))
        rows.append(json.dumps({"instruction": "Copy the list.", "context": words, "response": words}))
    root = tmp_path_factory.mktemp("long")
    (root / "rows.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    order = [b for i in range(0, 8, 4) for b in (i, i + 2, i + 1, i + 3)]
    (root / "interleaved.jsonl").write_text("".join(f"{r}\n" for b in order for r in rows[2 * b:2 * b + 2]))
    return root


def write_recipe(path: Path, model: Path, data: Path, output_dir: Path, sequence_parallel: int = 1,
                 packing: bool = False, accumulation: int = 2) -> Path:
    recipe = {
        "model": {"name_or_path": str(model)},
        "data": {"train": [{"path": str(data)}], "max_length": 384, "packing": packing},
        "train": {
            "max_steps": STEPS, "per_device_train_batch_size": 2, "gradient_accumulation_steps": accumulation,
            "train_sampling_strategy": "sequential", "optim": "sgd", "learning_rate": 0.1, "max_grad_norm": 0.0,
            "lr_scheduler_type": "constant", "logging_steps": 1, "save_steps": 2, "report_to": [], "seed": 7,
        },
        "sequence_parallel": sequence_parallel,
        "output_dir": str(output_dir),
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def trained(tmp_path_factory: pytest.TempPathFactory, model: Path, data: Path, strategy: str) -> Path:
    """Run (once per session) one of RUNS: `single` with `sftdist train`, the others with `sftdist launch`."""
    if strategy not in _runs:
        procs, accumulation, rows, (sp, _) = RUNS[strategy]
        root = tmp_path_factory.mktemp(f"sp-{strategy}")
        recipe = write_recipe(root / "recipe.yaml", model, data / f"{rows}.jsonl", root / "run", sp,
                              accumulation=accumulation)
        args = ["train", str(recipe)] if strategy == "single" else [
            "launch", str(recipe), "--strategy", strategy, "--num-processes", str(procs)]
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr[-4000:]
        _runs[strategy] = root / "run"
    return _runs[strategy]


def grad_norms(run: Path) -> list[float]:
    return [e["grad_norm"] for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in e]


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_processes_sharing_each_sample_learn_what_one_learns(tmp_path_factory, tiny_model, long_rows, strategy):
    run = trained(tmp_path_factory, tiny_model, long_rows, strategy)
    ref = trained(tmp_path_factory, tiny_model, long_rows, "single")
    procs, _, _, (sp, dp) = RUNS[strategy]

    state = json.loads((run / "sftdist_run.json").read_text())["distributed"]
    kind = (state["distributed_type"], state["num_processes"], state["zero_stage"])
    assert kind == ("DEEPSPEED", procs, int(strategy[4]))
    # Each sample is shared by 2 processes: the global batch is batch x accumulation x data-parallel groups.
    assert (state["sequence_parallel"], state["data_parallel"], state["global_batch"]) == (sp, dp, 4)

    losses, tokens = history(run)
    ref_losses, ref_tokens = history(ref)
    assert tokens == ref_tokens  # the same samples per step (data parallelism alone would see twice as many)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= LOSS_ATOL, (losses, ref_losses)
    assert losses[-1] < losses[0]
    # The gradient itself, not only its direction (under ZeRO-2, Ulysses' loss gives 2x without seqpar.install).
    assert grad_norms(run) == pytest.approx(grad_norms(ref), rel=1e-4)

    weights, ref_weights = final_weights(run), final_weights(ref)
    assert weights.keys() == ref_weights.keys()
    worst = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights)
    assert worst <= WEIGHT_ATOL, worst


@pytest.mark.parametrize("strategy, procs, packing, words", [
    ("ddp", 2, False, "but --strategy ddp is not DeepSpeed; use `sftdist launch` with --strategy zero1, zero2 or zero3"),
    ("fsdp2", 2, False, "--strategy fsdp2 is not DeepSpeed"),
    ("single", 1, False, "--strategy single is not DeepSpeed"),
    ("zero2", 3, False, "needs a number of processes that 2 divides (each sample is shared by 2); got 3"),
    ("zero3", 2, True, "cannot keep packed samples apart (DeepSpeed's Ulysses takes neither trl's packed rows nor "
                      "their sample boundaries under sdpa); set data.packing: false"),
])
def test_launches_that_cannot_share_samples_are_refused_before_starting(tmp_path, strategy, procs, packing, words):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "model", tmp_path / "d.jsonl", tmp_path / "run",
                          sequence_parallel=2, packing=packing)
    with pytest.raises(UserError) as e:
        build_launch(str(recipe), strategy, num_processes=procs if strategy != "single" else None, gpus=0)
    assert words in str(e.value) and str(e.value).startswith(f"{recipe}: sequence_parallel: 2")
    # The same recipe with sequence_parallel 1 is a valid launch.
    raw = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**raw, "sequence_parallel": 1, "data": {**raw["data"], "packing": False}}))
    build_launch(str(recipe), strategy, num_processes=procs if strategy != "single" else None, gpus=0)


def test_sequence_parallel_key(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "model", tmp_path / "d.jsonl", tmp_path / "run")
    assert load_recipe(recipe).sequence_parallel == 1
    assert load_recipe(recipe, ["sequence_parallel=4"]).sequence_parallel == 4
    with pytest.raises(UserError, match="sequence_parallel is 0; expected at least 1"):
        load_recipe(recipe, ["sequence_parallel=0"])
    with pytest.raises(UserError, match="sequence_parallel: got 'two', expected an integer"):
        load_recipe(recipe, ["sequence_parallel=two"])


def test_resumed_run_continues_where_it_stopped(tmp_path, tmp_path_factory, tiny_model, long_rows):
    """The zero2 run stopped after its step-2 checkpoint and started again: the trained batches are skipped (the
    trainer's own skip fails on DeepSpeed's SP dataloader) and steps 3-4 and the weights are the uninterrupted run's."""
    run = trained(tmp_path_factory, tiny_model, long_rows, "zero2")
    recipe = copy_run(run, run.parent / "recipe.yaml", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-4")
    proc = run_cli("launch", str(recipe), "--strategy", "zero2", "--num-processes", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"sftdist: resuming from {tmp_path / 'resumed' / 'checkpoint-2'}" in proc.stdout
    losses, _ = history(tmp_path / "resumed")
    assert max(abs(a - b) for a, b in zip(losses, history(run)[0])) <= LOSS_ATOL
    weights, ref_weights = final_weights(tmp_path / "resumed"), final_weights(run)
    assert max((weights[k] - ref_weights[k]).abs().max().item() for k in weights) <= WEIGHT_ATOL


def test_training_alone_with_sequence_parallel_is_refused(tmp_path, tiny_model, long_rows):
    """A rank that was not launched with DeepSpeed (`sftdist train` alone) refuses before loading anything."""
    from sftdist.train import build_sft_config

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model, long_rows / "rows.jsonl", tmp_path / "run", 2))
    with pytest.raises(UserError) as e:
        build_sft_config(recipe)
    assert str(e.value) == (
        f"{tmp_path / 'r.yaml'}: sequence_parallel: 2 runs on DeepSpeed's Ulysses, but this run was not launched "
        "with DeepSpeed; use `sftdist launch` with --strategy zero1, zero2 or zero3 and --num-processes a multiple of 2")
    assert not (tmp_path / "run").exists()
