"""The prepared-data cache (data/cache.py, data/pipeline.py, `sftdist prepare`): built once, read
back exactly, keyed by every input that changes the tokens, never half-written, one builder per
launch, and the same packed rows whatever the number of processes that read them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from launched import trained
from sftdist.data import load
from sftdist.data.cache import digest, fingerprint_inputs, verify
from sftdist.data.formats import render_row
from sftdist.data.pipeline import TRAIN_FILE, make_encoder, prepare
from sftdist.recipe import recipe_from_dict


def _recipe(tiny_model: Path, data: Path, cache: Path, **data_keys) -> dict:
    return {
        "model": {"name_or_path": str(tiny_model)},
        "data": {"train": [{"path": str(data)}], "max_length": 64, "cache_dir": str(cache), **data_keys},
        "output_dir": str(cache.parent / "run"),
    }


def _prepare(raw: dict, force: bool = False):
    from sftdist.model import load_tokenizer

    recipe = recipe_from_dict(raw)
    return prepare(recipe, lambda: load_tokenizer(recipe), force=force, progress=False)


def _columns(ds) -> dict:
    return ds.to_dict()


def test_warm_read_is_the_cold_build_and_matches_per_sample_encoding(tmp_path, tiny_model, demo_rows):
    raw = _recipe(tiny_model, demo_rows, tmp_path / "cache", packing=False, eval_fraction=0.25)
    cold = _prepare(raw)
    assert cold.how == "built"
    warm = _prepare(raw)
    assert warm.how == "hit" and warm.entry == cold.entry
    assert _columns(warm.train) == _columns(cold.train) and _columns(warm.eval) == _columns(cold.eval)
    # The batched encoder gives exactly what encoding each row alone gives (ids, and -100 outside the loss).
    from sftdist.model import load_tokenizer

    recipe = recipe_from_dict(raw)
    encoder = make_encoder(recipe, load_tokenizer(recipe))
    expected = set()
    for line in demo_rows.read_text().splitlines():
        ids, mask = encoder.encode_one(render_row(json.loads(line), "dolly", "default", "w"), "w")
        expected.add((tuple(ids), tuple(t if m else -100 for t, m in zip(ids, mask))))
    got = {(tuple(i), tuple(lab)) for ds in (warm.train, warm.eval) for i, lab in zip(ds[:]["input_ids"], ds[:]["labels"])}
    assert got == expected and len(warm.train) + len(warm.eval) == 64 and len(warm.eval) == 16
    assert warm.report.train_loss_tokens == sum(t != -100 for row in warm.train["labels"] for t in row)


def test_packed_rows_hold_every_sample_once_and_chunks_or_workers_change_nothing(tmp_path, tiny_model, demo_rows, monkeypatch):
    whole = _prepare(_recipe(tiny_model, demo_rows, tmp_path / "a"))
    rows = whole.train
    assert set(rows.column_names) == {"input_ids", "labels", "seq_lengths"}
    assert all(len(ids) == sum(s) <= 64 for ids, s in zip(rows["input_ids"], rows["seq_lengths"]))
    assert sum(len(s) for s in rows["seq_lengths"]) == whole.report.train_samples == 64
    monkeypatch.setattr(load, "CHUNK_ROWS", 5)  # 13 chunks instead of one
    chunked = _prepare(_recipe(tiny_model, demo_rows, tmp_path / "b"))
    assert chunked.entry.name == whole.entry.name
    assert _columns(chunked.train) == _columns(rows)
    workers = _prepare(_recipe(tiny_model, demo_rows, tmp_path / "c", num_proc=2))  # 12 chunks in 2 processes
    assert workers.entry.name == whole.entry.name and _columns(workers.train) == _columns(rows)


def test_each_fingerprint_input_changed_alone_makes_a_new_entry(tmp_path, tiny_model, demo_rows):
    import shutil

    data = tmp_path / "rows.jsonl"
    shutil.copy(demo_rows, data)
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    base = _recipe(model, data, tmp_path / "cache")

    def fp(raw: dict) -> str:
        return digest(fingerprint_inputs(recipe_from_dict(raw), lambda: None))

    def with_data(**keys) -> dict:
        return {**base, "data": {**base["data"], **keys}}

    def with_source(**keys) -> dict:
        return with_data(train=[{**base["data"]["train"][0], **keys}])

    ref = fp(base)
    assert fp(yaml.safe_load(yaml.safe_dump(base))) == ref  # same inputs, same entry
    assert fp(with_data(num_proc=2)) == ref  # changes no token
    variants = {
        "format": with_source(format="dolly"),
        "weight": with_source(weight=2.0),
        "limit": with_source(limit=10),
        "template": with_data(template="alpaca"),
        "chat_template": with_data(chat_template="chatml"),
        "max_length": with_data(max_length=65),
        "packing": with_data(packing=False),
        "loss_on": with_data(loss_on="all"),
        "truncate": with_data(truncate=True),
        "eval_fraction": with_data(eval_fraction=0.1),
        "seed": with_data(seed=1),
        "eval source": with_data(eval=[{"path": str(data)}]),
        "train.shuffle_dataset": {**base, "train": {"shuffle_dataset": True}},
    }
    seen = {ref}
    for name, raw in variants.items():
        new = fp(raw)
        assert new not in seen, name
        seen.add(new)
    with data.open("a") as f:  # the source's content
        f.write(data.read_text().splitlines()[0] + "\n")
    assert fp(base) not in seen
    seen.add(fp(base))
    tok = model / "tokenizer.json"  # the tokenizer's files
    tok.write_text(tok.read_text() + "\n")
    assert fp(base) not in seen


def entries(cache: Path) -> list[Path]:
    """The cache's entries: its directories but the digests of the data files (cache.DIGESTS_DIR)."""
    from sftdist.data.cache import DIGESTS_DIR

    return [p for p in cache.iterdir() if p.is_dir() and p.name != DIGESTS_DIR]


def test_prepare_cli_builds_then_hits_and_force_rebuilds(tmp_path, tiny_model, demo_rows):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_model, demo_rows, tmp_path / "cache")))
    first = run_cli("prepare", str(recipe))
    assert first.returncode == 0, first.stderr
    assert "data cache built" in first.stdout and "rows read" in first.stdout and "packing at max_length 64" in first.stdout
    second = run_cli("prepare", str(recipe))
    assert "data cache hit" in second.stdout and "rows read" not in second.stdout
    report = [line for line in second.stdout.splitlines() if not line.startswith("sftdist:")]
    assert report == [line for line in first.stdout.splitlines() if not line.startswith("sftdist:")]
    forced = run_cli("prepare", str(recipe), "--force")
    assert "data cache built" in forced.stdout
    assert len(entries(tmp_path / "cache")) == 1


def test_a_build_killed_midway_is_never_used_and_the_next_run_rebuilds(tmp_path, tiny_model):
    rows = (REPO / "sftdist" / "demo" / "train.jsonl").read_text()
    data = tmp_path / "big.jsonl"
    data.write_text(rows * 8)  # 34,400 rows: four chunks, several seconds of encoding
    cache = tmp_path / "cache"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_model, data, cache)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftdist", "prepare", str(recipe)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    for line in proc.stdout:  # killed once the first chunk is written, mid-build
        if "rows read" in line:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    entries = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert entries == [] and any(p.name.startswith(".") for p in cache.iterdir())
    # Another recipe's entry (a small one) built in the same cache removes the dead build's hidden folder too.
    small = tmp_path / "small.jsonl"
    small.write_text("".join(rows.splitlines(keepends=True)[:50]))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(_recipe(tiny_model, small, cache)))
    assert run_cli("prepare", str(other)).returncode == 0
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
    again = run_cli("prepare", str(recipe))
    assert again.returncode == 0, again.stderr
    assert "data cache built" in again.stdout
    entry = Path(again.stdout.split("cache entry: ")[1].split()[0])
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # the killed build's leftovers are gone
    assert verify(entry) and "rows: 34400, kept 34400" in again.stdout


def _cut(data: bytes) -> bytes:
    return data[:-100]


def _flipped(data: bytes) -> bytes:
    """The same size, eight bytes of token ids inverted: only a checksum tells."""
    mid = len(data) // 2
    return data[:mid] + bytes(255 - b for b in data[mid : mid + 8]) + data[mid + 8 :]


@pytest.mark.parametrize("damage, why", [(_cut, "train.arrow has "), (_flipped, "train.arrow does not match its checksum")])
def test_a_corrupt_entry_is_rebuilt_with_a_warning(tmp_path, tiny_model, demo_rows, damage, why):
    raw = _recipe(tiny_model, demo_rows, tmp_path / "cache")
    first = _prepare(raw)
    entry, good = first.entry, _columns(first.train)
    train = entry / TRAIN_FILE
    train.write_bytes(damage(train.read_bytes()))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    proc = run_cli("prepare", str(recipe))
    assert proc.returncode == 0, proc.stderr
    assert f"warning: data cache entry {entry} is incomplete or corrupt ({why}" in proc.stderr
    assert "data cache built" in proc.stdout
    assert _columns(_prepare(raw).train) == good


def _in_small_fs(mnt: Path, options: str, *args: str) -> subprocess.CompletedProcess:
    """Run `sftdist ARGS` with a fresh tmpfs (mount `options`) at `mnt`, inside a private mount
    namespace (`unshare`, so no root is needed); the last stdout line lists what the tmpfs holds after."""
    mnt.mkdir(exist_ok=True)
    script = 'mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; m="$2"; shift 2; "$@"; rc=$?; echo "LEFT: $(find "$m" -mindepth 1 | sort | tr "\\n" " ")"; exit $rc'
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", options, str(mnt),
           sys.executable, "-m", "sftdist", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("options, why", [("ro", "Read-only file system"), ("size=64k", "No space left on device")])
def test_a_read_only_or_full_cache_is_a_one_line_error_and_leaves_nothing(tmp_path, tiny_model, options, why):
    data = tmp_path / "rows.jsonl"
    data.write_text((REPO / "sftdist" / "demo" / "train.jsonl").read_text())  # 300 KB of tokens: over 64k
    mnt = tmp_path / "small"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_model, data, mnt / "cache")))
    proc = _in_small_fs(mnt, options, "prepare", str(recipe))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"error: {mnt / 'cache'}: cannot write the data cache ({why})" in proc.stderr
    left = proc.stdout.strip().splitlines()[-1].split()
    assert left[0] == "LEFT:" and all(p == str(mnt / "cache") or p.endswith(".lock") for p in left[1:]), left


def test_a_weight_that_keeps_no_sample_is_refused_before_output_dir_is_claimed(tmp_path, tiny_model, demo_rows):
    raw = _recipe(tiny_model, demo_rows, tmp_path / "cache")
    raw["data"]["train"][0]["weight"] = 0.001
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    proc = run_cli("train", str(recipe))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "data.train[0].weight 0.001 keeps none of the 64 samples" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_two_process_launch_builds_once_and_the_entry_does_not_depend_on_the_process_count(
    tmp_path_factory, tiny_model, demo_rows
):
    run = trained(tmp_path_factory, tiny_model, demo_rows, "full", "ddp")
    log = (run.parent / "launch.log").read_text()
    # Rank 0 (local rank 0) built it; rank 1 waited for it or, if it came late, found it complete.
    assert log.count("building the data cache") == 1 and log.count("rank 0 data cache built") == 1, log
    assert "rank 1 data cache waited" in log or "rank 1 data cache hit" in log, log
    cache = run.parent / "cache"
    (entry,) = entries(cache)
    # One process, same recipe, same cache: the entry the 2-process launch built is the one it uses.
    proc = run_cli("prepare", str(run.parent / "recipe.yaml"), env={"SFTDIST_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert f"data cache hit: {entry}" in proc.stdout


def test_other_local_ranks_wait_for_the_files_then_read_the_entry(tmp_path, tiny_model, demo_rows):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_model, demo_rows, tmp_path / "cache")))
    env = {**os.environ, "RANK": "1", "LOCAL_RANK": "1"}
    waiter = subprocess.Popen([sys.executable, "-m", "sftdist", "prepare", str(recipe)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = waiter.stdout.readline()  # it says what it waits for, and builds nothing
    assert f"rank 1 waiting for the data cache {tmp_path / 'cache'}" in first and waiter.poll() is None
    built = run_cli("prepare", str(recipe))
    assert "data cache built" in built.stdout
    out, _ = waiter.communicate(timeout=120)
    assert waiter.returncode == 0
    (entry,) = entries(tmp_path / "cache")
    assert f"rank 1 data cache waited: {entry}" in out and "building" not in out


def test_train_shuffle_dataset_shuffles_the_same_samples_with_the_seed(tmp_path, tiny_model, demo_rows):
    """trl's `shuffle_dataset` is no longer applied by trl (its preparation is skipped): the build applies it."""
    def rows(**train) -> list:
        raw = {**_recipe(tiny_model, demo_rows, tmp_path / "cache", packing=False), "train": train}
        return _prepare(raw).train.to_dict()["input_ids"]

    in_order, shuffled = rows(), rows(shuffle_dataset=True)
    assert shuffled != in_order and sorted(shuffled) == sorted(in_order)
    assert rows(shuffle_dataset=True) == shuffled  # from data.seed: the same order every time


def test_held_out_samples_are_never_trained_on_when_a_weight_repeats_them(tmp_path, tiny_model, demo_rows):
    """The eval split is drawn from the distinct samples first; the weight then repeats what is left."""
    raw = _recipe(tiny_model, demo_rows, tmp_path / "cache", packing=False, eval_fraction=0.25)
    raw["data"]["train"][0]["weight"] = 2.0
    data = _prepare(raw)
    train = [tuple(ids) for ids in data.train["input_ids"]]
    held = [tuple(ids) for ids in data.eval["input_ids"]]
    assert len(set(train) | set(held)) == 64  # the demo rows are distinct samples
    assert len(held) == len(set(held)) == 16 and not set(held) & set(train)
    assert len(train) == 2 * 48 and all(train.count(t) == 2 for t in set(train))


def test_a_source_whose_every_sample_is_held_out_is_refused_by_name():
    from sftdist.data.mix import split_and_weight
    from sftdist.errors import UserError

    outcomes = []
    for seed in range(8):  # one sample in four is held out: sometimes the one-sample source's
        try:
            train, held = split_and_weight([1, 3], [1.0, 2.0], ["a.jsonl", "b.jsonl"], 0.25, False, seed, "r.yaml")
            outcomes.append((sorted(train.tolist()), held.tolist()))
        except UserError as e:
            assert str(e) == ("r.yaml: data.eval_fraction=0.25 holds out all 1 samples of a.jsonl, leaving none to "
                              "train on; lower it or add data")
            outcomes.append(None)
    assert None in outcomes
    for train, held in filter(None, outcomes):  # b's samples twice, the held-out one never
        assert len(held) == 1 and held[0] not in train and train == sorted([0] + [i for i in (1, 2, 3) if i != held[0]] * 2)


def test_workers_bounded_by_the_chunks_and_the_cores(tmp_path, tiny_model, demo_rows, monkeypatch):
    """data.num_proc: 40 forks no worker for a one-chunk source, and no more than the chunks left or the cores."""
    import multiprocessing.pool

    pools: list[int] = []
    real_init = multiprocessing.pool.Pool.__init__

    def counted(self, processes=None, *args, **kwargs):
        pools.append(processes)
        real_init(self, processes, *args, **kwargs)

    monkeypatch.setattr(multiprocessing.pool.Pool, "__init__", counted)
    one_chunk = _prepare(_recipe(tiny_model, demo_rows, tmp_path / "a", num_proc=40))
    assert pools == [] and one_chunk.report.train_samples == 64
    monkeypatch.setattr(load, "CHUNK_ROWS", 20)  # 4 chunks: the first encoded here, 3 left for workers
    three_left = _prepare(_recipe(tiny_model, demo_rows, tmp_path / "b", num_proc=40))
    assert pools == [min(3, len(os.sched_getaffinity(0)))]
    assert three_left.entry.name == one_chunk.entry.name and _columns(three_left.train) == _columns(one_chunk.train)
