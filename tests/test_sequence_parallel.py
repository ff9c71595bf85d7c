"""Sequence parallelism (`sequence_parallel: 2`, DeepSpeed Ulysses) on CPU: processes sharing every sample learn
what one process learns from the whole samples, packed or not; packed samples never attend to each other; each step
is padded only to what it holds; and runs that cannot work are refused before they start.

The gate runs real `sftdist launch` processes against `sftdist train` in one process that takes the same rows per
optimizer step (4 rows; samples read in order, `train_sampling_strategy: sequential`):
- unpacked (`long.jsonl`: 16 samples of 200-330 tokens; the answer copies a 40-80 word list, so about half of each
  sample's tokens carry loss and the two halves of a sample hold different numbers of them): zero2, 2 processes x
  batch 2 x accumulation 2, against 1 process x batch 2 x accumulation 2;
- packed (`mixed.jsonl`: 40 samples of 40-330 tokens, packed into rows of 200 to 384 tokens, some holding 3 or 4
  samples): zero2, 2 processes x batch 1 x accumulation 4, and zero3, 4 processes = sequence_parallel 2 x
  data-parallel 2, batch 1 x accumulation 2, against 1 process x batch 2 x accumulation 2. Each SP group reads its
  ranks' rows one after the other, so every run's step k holds packed rows 4k to 4k + 3.
Plain SGD without clipping: its update is proportional to the gradient, so a wrong gradient scale shows in the
weights (Adam and clipping would hide it), and grad_norm is compared as well. Tolerances are launched.py's (fp32
sums in a different order); measured: losses <= 1e-6, weights <= 1.2e-7.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, copy_run, run_cli
from launched import LOSS_ATOL, STEPS, WEIGHT_ATOL, final_weights, history
from sftdist.errors import UserError
from sftdist.launcher import build_launch
from sftdist.recipe import load_recipe

WORDS = "apple kite owl rain goat door ink cat milk dog hat moon bird lamp nest".split()
MAX_LENGTH = 384
# name -> (strategy, processes, batch, accumulation, data, expected (sequence_parallel, data_parallel))
RUNS = {
    "single": ("single", 1, 2, 2, "long", (1, 1)),
    "zero2": ("zero2", 2, 2, 2, "long", (2, 1)),
    "single-packed": ("single", 1, 2, 2, "mixed", (1, 1)),
    "zero2-packed": ("zero2", 2, 1, 4, "mixed", (2, 1)),
    "zero3-packed": ("zero3", 4, 1, 2, "mixed", (2, 2)),
}
_runs: dict[str, Path] = {}


def dolly_rows(rng: random.Random, words: tuple[int, int], n: int) -> list[str]:
    rows = []
    for _ in range(n):
        text = "\n".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
        rows.append(json.dumps({"instruction": "Copy the list.", "context": text, "response": text}))
    return rows


@pytest.fixture(scope="session")
def long_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`long.jsonl` (16 samples of 200-330 tokens) and `mixed.jsonl` (20 of 40-80 tokens among 20 of 200-330,
    shuffled); returns the folder."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("long")
    (root / "long.jsonl").write_text("\n".join(dolly_rows(rng, (40, 80), 16)) + "\n", encoding="utf-8")
    mixed = dolly_rows(rng, (40, 80), 20) + dolly_rows(rng, (3, 12), 20)
    rng.shuffle(mixed)
    (root / "mixed.jsonl").write_text("\n".join(mixed) + "\n", encoding="utf-8")
    return root


def write_recipe(path: Path, model: Path, data: Path, output_dir: Path, sequence_parallel: int = 1,
                 packing: bool = False, batch: int = 2, accumulation: int = 2, attention: str = "auto") -> Path:
    recipe = {
        "model": {"name_or_path": str(model), "attn_implementation": attention},
        "data": {"train": [{"path": str(data)}], "max_length": MAX_LENGTH, "packing": packing},
        "train": {
            "max_steps": STEPS, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
            "train_sampling_strategy": "sequential", "optim": "sgd", "learning_rate": 0.1, "max_grad_norm": 0.0,
            "lr_scheduler_type": "constant", "logging_steps": 1, "save_steps": 2, "report_to": [], "seed": 7,
        },
        "sequence_parallel": sequence_parallel,
        "output_dir": str(output_dir),
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def trained(tmp_path_factory: pytest.TempPathFactory, model: Path, data: Path, *names: str) -> list[Path]:
    """Run (once per session) RUNS `names`, together (a run spends much of its time starting processes that wait
    on each other): `single` with `sftdist train`, the others with `sftdist launch`; their output_dirs."""

    def train(name: str, root: Path) -> Path:
        strategy, procs, batch, accumulation, rows, (sp, _) = RUNS[name]
        recipe = write_recipe(root / "recipe.yaml", model, data / f"{rows}.jsonl", root / "run", sp,
                              packing=rows == "mixed", batch=batch, accumulation=accumulation)
        args = ["train", str(recipe)] if strategy == "single" else [
            "launch", str(recipe), "--strategy", strategy, "--num-processes", str(procs)]
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return root / "run"

    missing = [n for n in names if n not in _runs]
    roots = [tmp_path_factory.mktemp(f"sp-{n}") for n in missing]
    with ThreadPoolExecutor(len(missing) or 1) as pool:
        _runs.update(zip(missing, pool.map(train, missing, roots)))
    return [_runs[n] for n in names]


def grad_norms(run: Path) -> list[float]:
    return [e["grad_norm"] for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def packed_row_lengths(run: Path) -> list[list[int]]:
    """The sample lengths of each packed row the run trained on, in order (the data cache entry it used)."""
    from sftdist.data.pipeline import prepare
    from sftdist.model import load_tokenizer

    recipe = load_recipe(run.parent / "recipe.yaml")
    return prepare(recipe, lambda: load_tokenizer(recipe), progress=False).train["seq_lengths"]


@pytest.mark.parametrize("name, reference", [
    ("zero2", "single"), ("zero2-packed", "single-packed"), ("zero3-packed", "single-packed")])
def test_processes_sharing_each_sample_learn_what_one_learns(tmp_path_factory, tiny_model, long_rows, name, reference):
    run, ref = trained(tmp_path_factory, tiny_model, long_rows, name, reference)
    strategy, procs, _, _, data, (sp, dp) = RUNS[name]

    state = json.loads((run / "sftdist_run.json").read_text())["distributed"]
    kind = (state["distributed_type"], state["num_processes"], state["zero_stage"])
    assert kind == ("DEEPSPEED", procs, int(strategy[4]))
    # Each sample is shared by 2 processes: the global batch is batch x accumulation x data-parallel groups.
    assert (state["sequence_parallel"], state["data_parallel"], state["global_batch"]) == (sp, dp, 4)

    losses, tokens = history(run)
    ref_losses, ref_tokens = history(ref)
    if data == "long":
        assert tokens == ref_tokens  # the same samples per step (data parallelism alone would see twice as many)
    else:
        # trl counts a packed micro-batch's tokens as the length the model got: under SP, each row of a refill (one
        # row per rank of the group) padded to the longer one, rounded up to a multiple of 2; the single run's rows
        # are not padded. Rows 4k to 4k + 3 make step k, in refills (4k, 4k + 1) and (4k + 2, 4k + 3).
        samples = packed_row_lengths(run)
        assert max(len(r) for r in samples[:4 * STEPS]) >= 3  # rows of 3 and more samples
        rows = [sum(r) for r in samples]
        pair = [-(-max(rows[i], rows[i + 1]) // 2) * 2 for i in range(0, 4 * STEPS, 2)]
        assert ref_tokens == [sum(rows[4 * k:4 * k + 4]) for k in range(STEPS)]
        assert tokens == [2 * (pair[2 * k] + pair[2 * k + 1]) for k in range(STEPS)]
        assert min(pair) < MAX_LENGTH  # not max_length: what each step holds
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= LOSS_ATOL, (losses, ref_losses)
    assert losses[-1] < losses[0]
    # The gradient itself, not only its direction (under ZeRO-2, Ulysses' loss gives 2x without seqpar.install).
    assert grad_norms(run) == pytest.approx(grad_norms(ref), rel=1e-4)

    weights, ref_weights = final_weights(run), final_weights(ref)
    assert weights.keys() == ref_weights.keys()
    worst = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights)
    assert worst <= WEIGHT_ATOL, worst


def test_resumed_run_continues_where_it_stopped(tmp_path, tmp_path_factory, tiny_model, long_rows):
    """The packed zero2 run stopped after its step-2 checkpoint and started again: the trained rows are skipped (the
    trainer's own skip fails on DeepSpeed's SP dataloader) and steps 3-4 and the weights are the uninterrupted run's."""
    (run,) = trained(tmp_path_factory, tiny_model, long_rows, "zero2-packed")
    recipe = copy_run(run, run.parent / "recipe.yaml", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-4")
    # On 4 processes (SP 2 x DP 2), DeepSpeed's universal conversion would fail in every process: refused before
    # any starts, in one line.
    proc = run_cli("launch", str(recipe), "--strategy", "zero2", "--num-processes", "4")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == [
        f"error: {tmp_path / 'resumed' / 'checkpoint-2'}: written with sequence_parallel 2 by 2 processes; DeepSpeed "
        "cannot convert a sequence-parallel ZeRO checkpoint to another number of processes: launch 2 processes to "
        "resume it, or pass --no-resume to start over"], proc.stderr
    assert not (tmp_path / "resumed" / "checkpoint-2" / "global_step2_universal").exists()
    proc = run_cli("launch", str(recipe), "--strategy", "zero2", "--num-processes", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"sftdist: resuming from {tmp_path / 'resumed' / 'checkpoint-2'}" in proc.stdout
    losses, _ = history(tmp_path / "resumed")
    assert max(abs(a - b) for a, b in zip(losses, history(run)[0])) <= LOSS_ATOL
    weights, ref_weights = final_weights(tmp_path / "resumed"), final_weights(run)
    assert max((weights[k] - ref_weights[k]).abs().max().item() for k in weights) <= WEIGHT_ATOL


def test_packed_samples_never_attend_to_each_other_under_ulysses(tmp_path, tiny_model):
    """tests/workers/sp_rows.py: two gloo ranks, trl's collator, sftdist's padding and attention, DeepSpeed's adapter
    and Ulysses. Rank 0's packed row holds samples A B C (91 tokens), rank 1's D E (55 tokens)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests" / "workers" / "sp_rows.py"), str(tiny_model), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    for attention in ("sdpa", "eager"):
        got = result[attention]
        # Both rows padded to the longer one (91 -> 92, a multiple of 2), never to max_length; each rank holds half.
        assert got["shapes"] == [[1, 46], [1, 46]]
        # Each token's loss is the one a single process gives the unpadded row with transformers' packed mask.
        assert got["sp_vs_one_process"] <= 1e-5, got
        # Replacing B's tokens changes B's losses and no other sample's, in the same row or the other rank's
        # (measured: exactly 0; Ulysses alone, below, moves them by 0.13).
        assert got["other_samples_change"] <= 1e-6 and got["changed_sample_change"] > 0.1, got
    # What Ulysses does alone: it drops the mask, and C (after B in the same row) sees B.
    assert result["sdpa_ulysses_alone"]["other_samples_change"] > 1e-3
    # Unpacked: trl pads each batch of 2 to its longest sample (41 and 25 tokens), sftdist to the group's (42).
    assert result["unpacked_shapes"] == [[2, 21], [2, 21]]
    assert result["unpacked_keys"] == ["attention_mask", "input_ids", "position_ids", "shift_labels"]


def test_flash_attention_reads_the_same_sample_boundaries():
    """Flash attention cannot run here (no GPU). Under Ulysses it gets no mask and the gathered position_ids, from
    which transformers derives its varlen cu_seqlens: the same boundaries `sample_spans` gives sdpa and eager, and
    trl's collator computes (the 1-D `cu_seq_lens_q` that DeepSpeed's adapter cannot split)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sftdist.seqpar_attention import sample_spans

    lengths = [37, 1, 23, 31, 2]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": list(range(3, 3 + sum(lengths))), "seq_lengths": lengths}])
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    edges = [0, *[b for _, b in sample_spans(batch["position_ids"][0])]]
    assert edges == cu_seqlens.tolist() == batch["cu_seq_lens_q"].tolist()
    # Padding (position 0 each) after a sample is one span, not one per pad token.
    padded = torch.nn.functional.pad(batch["position_ids"][0], (0, 5))
    assert sample_spans(padded)[-2:] == [(sum(lengths) - 2, sum(lengths)), (sum(lengths), sum(lengths) + 5)]


@pytest.mark.parametrize("strategy, procs, changes, words", [
    ("ddp", 2, {}, "but --strategy ddp is not DeepSpeed; use `sftdist launch` with --strategy zero1, zero2 or zero3"),
    ("fsdp2", 2, {}, "--strategy fsdp2 is not DeepSpeed"),
    ("single", 1, {}, "--strategy single is not DeepSpeed"),
    ("zero2", 3, {}, "needs a number of processes that 2 divides (each sample is shared by 2); got 3"),
    ("zero3", 2, {"packing": True}, "with data.packing takes one packed row (up to data.max_length tokens) per "
                                    "micro-batch; set train.per_device_train_batch_size: 1 and raise "
                                    "gradient_accumulation_steps for more rows per step (got 2)"),
    ("zero2", 2, {"attention": "flex_attention"}, "needs model.attn_implementation sdpa, eager, flash_attention_2, "
                                                  "flash_attention_3 (Ulysses wraps one of those); got flex_attention"),
])
def test_launches_that_cannot_share_samples_are_refused_before_starting(tmp_path, strategy, procs, changes, words):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "model", tmp_path / "d.jsonl", tmp_path / "run",
                          sequence_parallel=2, **changes)
    with pytest.raises(UserError) as e:
        build_launch(str(recipe), strategy, num_processes=procs if strategy != "single" else None, gpus=0)
    assert words in str(e.value) and str(e.value).startswith(f"{recipe}: sequence_parallel: 2")
    # The same recipe with sequence_parallel 1 is a valid launch.
    write_recipe(recipe, tmp_path / "model", tmp_path / "d.jsonl", tmp_path / "run", sequence_parallel=1,
                 **{**changes, "attention": "auto"})
    build_launch(str(recipe), strategy, num_processes=procs if strategy != "single" else None, gpus=0)


def test_plan_splits_one_packed_row_per_micro_batch(tmp_path, tiny_model):
    """`sftdist plan` under SP with packing: a micro-batch is one packed row of max_length tokens, 1/N per rank."""
    from sftdist.plan import count_model, decoder_activation_bytes, format_plan, make_plan
    from sftdist.recipe import with_train

    base = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "d.jsonl", tmp_path / "run",
                                    packing=True, batch=1))
    counts = count_model(base)
    plans = {n: make_plan(dataclasses.replace(base, sequence_parallel=n), 2, 10**9, counts=counts) for n in (1, 2)}
    ref = decoder_activation_bytes(base, counts, plans[1].work)
    assert decoder_activation_bytes(plans[2].recipe, counts, plans[2].work) == pytest.approx(tuple(x / 2 for x in ref))
    assert f"sequence_parallel options (one {MAX_LENGTH}-token packed row per micro-batch" in format_plan(plans[1])
    with pytest.raises(UserError, match="takes one packed row"):
        make_plan(dataclasses.replace(with_train(base, per_device_train_batch_size=2), sequence_parallel=2), 2,
                  10**9, counts=counts)


def test_sequence_parallel_key(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "model", tmp_path / "d.jsonl", tmp_path / "run")
    assert load_recipe(recipe).sequence_parallel == 1
    assert load_recipe(recipe, ["sequence_parallel=4"]).sequence_parallel == 4
    with pytest.raises(UserError, match="sequence_parallel is 0; expected at least 1"):
        load_recipe(recipe, ["sequence_parallel=0"])
    with pytest.raises(UserError, match="sequence_parallel: got 'two', expected an integer"):
        load_recipe(recipe, ["sequence_parallel=two"])


def test_training_alone_with_sequence_parallel_is_refused(tmp_path, tiny_model, long_rows):
    """A rank that was not launched with DeepSpeed (`sftdist train` alone) refuses before loading anything."""
    from sftdist.train import build_sft_config

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model, long_rows / "long.jsonl", tmp_path / "run", 2))
    with pytest.raises(UserError) as e:
        build_sft_config(recipe)
    assert str(e.value) == (
        f"{tmp_path / 'r.yaml'}: sequence_parallel: 2 runs on DeepSpeed's Ulysses, but this run was not launched "
        "with DeepSpeed; use `sftdist launch` with --strategy zero1, zero2 or zero3 and --num-processes a multiple of 2")
    assert not (tmp_path / "run").exists()
