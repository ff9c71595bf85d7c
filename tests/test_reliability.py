"""Nothing lost, nothing silent: --overwrite never deletes what the run reads, one run per output_dir,
a preemption during loading still exits 75, and a full disk while checkpointing is one line with nothing
marked complete. (Resume after a finished run or a damaged checkpoint: tests/test_checkpoint.py.)"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, decide, run_cli
from sftdist import checkpoint, lock
from sftdist.errors import EXIT_PREEMPTED, UserError
from sftdist.recipe import recipe_from_dict
from sftdist.rundir import COMPLETE_MARKER, MANIFEST, RECIPE_FILE

DEMO = REPO / "sftdist" / "demo" / "train.jsonl"


def raw_recipe(model: Path, output_dir: str, data: Path = DEMO, **train) -> dict:
    return {
        "model": {"name_or_path": str(model)},
        "data": {"train": [{"path": str(data), "limit": 200}], "max_length": 128},
        "train": {"max_steps": 6, "save_steps": 3, "logging_steps": 1, "per_device_train_batch_size": 4,
                  "learning_rate": 1e-3, "report_to": [], **train},
        "output_dir": output_dir,
        "max_shard_size": "400KB",
    }


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# --- 1. --overwrite ------------------------------------------------------------------------------------
def test_overwrite_of_the_working_directory_is_refused_and_deletes_nothing(tmp_path, tiny_model):
    """`output_dir: ""` is the working directory: --overwrite used to empty it, recipe and data included."""
    shutil.copy(DEMO, tmp_path / "train.jsonl")
    (tmp_path / RECIPE_FILE).write_text(yaml.safe_dump({"output_dir": "."}))  # an earlier run wrote here
    write_recipe(tmp_path / "recipe.yaml", raw_recipe(tiny_model, "", data=Path("train.jsonl")))
    before = snapshot(tmp_path)
    proc = run_cli("train", "recipe.yaml", "--overwrite", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc.stderr)
    assert "--overwrite would delete" in line and "which this recipe reads" in line
    assert snapshot(tmp_path) == before


def _decide(raw: dict, overwrite: bool = True) -> str:
    return decide(recipe_from_dict(raw), overwrite=overwrite).action


def test_overwrite_refuses_what_is_not_an_sftdist_run_or_holds_the_model_or_data(tmp_path, tiny_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite refused: output_dir is not empty and holds no sftdist_recipe"):
        _decide(raw_recipe(tiny_model, str(out)))
    (out / RECIPE_FILE).write_text("output_dir: elsewhere\n")
    assert _decide(raw_recipe(tiny_model, str(out))) == "replace"  # an sftdist run that holds nothing we read

    model = out / "base"
    shutil.copytree(tiny_model, model)
    with pytest.raises(UserError, match=r"would delete the model \(.*base\), which this recipe reads"):
        _decide(raw_recipe(model, str(out)))
    data = out / "data" / "train.jsonl"
    data.parent.mkdir()
    shutil.copy(DEMO, data)
    with pytest.raises(UserError, match="would delete the data"):
        _decide(raw_recipe(tiny_model, str(out), data=data))
    # Starting over (--no-resume, same recipe) deletes checkpoints and final/: not when the model is final/.
    raw = raw_recipe(out / "final", str(out))
    shutil.copytree(tiny_model, out / "final")
    (out / RECIPE_FILE).write_text(yaml.safe_dump(recipe_from_dict(raw).to_dict()))
    with pytest.raises(UserError, match="starting over would delete the model"):
        decide(recipe_from_dict(raw), resume=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _decide(raw_recipe(tiny_model, str(empty))) == "fresh"


# --- 3. one run per output_dir ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "launch"])
def test_second_run_on_a_held_output_dir_exits_2_naming_the_holder(tmp_path, tiny_model, command):
    """Under `launch` too, in one line: rank 0 refuses and tells the other ranks, which used to fail in their
    next collective with gloo's traceback (44 lines)."""
    out = tmp_path / "run"
    held = lock.acquire(out)  # this test process is the first run
    try:
        r = write_recipe(tmp_path / "r.yaml", raw_recipe(tiny_model, str(out)))
        launch = ["--strategy", "ddp", "--num-processes", "2"] if command == "launch" else []
        proc = run_cli(command, str(r), *launch)
    finally:
        held.release()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.strip()]
    assert line.startswith("error: ") and f"pid {os.getpid()} on host {socket.gethostname()}" in line
    assert str(out) in line
    assert not out.exists()  # the lock created it for this run, and released it empty


def test_a_full_file_system_at_start_is_one_line_and_leaves_nothing(tmp_path, tiny_model):
    """The lock is the first thing a run writes: on a full disk it used to fail with a traceback and leave
    sftdist.lock behind. A real full file system: a tiny tmpfs, filled."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], check=True)
    try:
        (disk / "fill").write_bytes(b"\0" * (16 << 10))
        before = snapshot(disk)
        r = write_recipe(tmp_path / "r.yaml", raw_recipe(tiny_model, str(disk / "runs" / "run")))
        proc = run_cli("train", str(r))
        after = snapshot(disk)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"error: {disk / 'runs' / 'run' / lock.LOCK_FILE}: cannot lock the output_dir "
                                   "(No space left on device)")
    assert after == before


def test_stale_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, capsys):
    out = tmp_path / "run"
    code = (f"from pathlib import Path; import os, signal; from sftdist import lock; lock.acquire(Path({str(out)!r}));"
            " os.kill(os.getpid(), signal.SIGKILL)")
    crashed = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert crashed.returncode == -signal.SIGKILL and (out / lock.LOCK_FILE).is_file()
    dead_pid = json.loads((out / lock.LOCK_FILE).read_text())["pid"]

    held = lock.acquire(out)
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "taking over a stale lock" in err and f"(pid {dead_pid} on host" in err
    assert json.loads((out / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):
        lock.acquire(out)  # held now, even by another open file in this process
    held.release()
    assert not (out / lock.LOCK_FILE).exists()


# --- 6. a preemption signal before the trainer exists ------------------------------------------------------
def _catches(pid: int, sig: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_signal_during_loading_saves_at_the_first_step_and_exits_75(tmp_path, tiny_model):
    """Before, SIGUSR1 during the imports killed the run (exit 138), which slurm does not requeue."""
    r = write_recipe(tmp_path / "r.yaml", raw_recipe(tiny_model, str(tmp_path / "run")))
    proc = subprocess.Popen([sys.executable, "-m", "sftdist", "train", str(r)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not _catches(proc.pid, signal.SIGUSR1):  # as soon as sftdist handles it: during the imports
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert "stopped by a signal at step 1 after saving a checkpoint" in out
    run = tmp_path / "run"
    assert checkpoint.complete_checkpoints(run) == [run / "checkpoint-1"] and not (run / "final").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_the_data_build_of_a_launch_stops_every_rank_and_blocks_no_rerun(tmp_path, tiny_model, sig):
    """Before, rank 0 died in a broadcast (a gloo traceback), the launcher said 75 with no checkpoint saved, and
    the recipe it had written into output_dir refused a changed recipe. Now: 143/130, one line, nothing written."""
    raw = raw_recipe(tiny_model, str(tmp_path / "run"), max_steps=1)
    raw["data"] = {**raw["data"], "train": [{"path": str(DEMO)}], "cache_dir": str(tmp_path / "cache")}  # 4300 rows
    r = write_recipe(tmp_path / "r.yaml", raw)
    proc = subprocess.Popen([sys.executable, "-m", "sftdist", "launch", str(r), "--strategy", "ddp",
                             "--num-processes", "2"], cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    for line in proc.stdout:  # rank 1 waits while rank 0 builds the data cache
        if "waiting for the data cache" in line:
            proc.send_signal(sig)
            break
        assert time.time() < deadline
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [f"sftdist launch: stopped by {sig.name} before this launch saved a checkpoint; run the same "
                     "command again"], stderr[-3000:]
    assert not (tmp_path / "run").exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]  # no partial entry
    changed = write_recipe(tmp_path / "r2.yaml", {**raw, "data": {**raw["data"], "train": [{"path": str(DEMO), "limit": 40}]}})
    rerun = run_cli("train", str(changed))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (tmp_path / "run" / "final").is_dir()


# --- 7. a full disk while checkpointing -----------------------------------------------------------------------
def test_full_disk_during_a_checkpoint_is_one_line_and_nothing_is_complete(tmp_path, tiny_model, monkeypatch):
    import torch

    from sftdist.train import run_training

    real_save = torch.save

    def save(obj, f, *a, **kw):  # the writer runs out of space half-way through optimizer.pt
        if str(f).endswith("optimizer.pt"):
            Path(f).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    recipe = recipe_from_dict(raw_recipe(tiny_model, str(out), max_steps=3))
    with pytest.raises(UserError) as e:
        run_training(recipe)
    assert str(e.value).startswith(f"{out / 'checkpoint-3'}: no space left on device while saving")
    assert "\n" not in str(e.value)
    assert (out / "checkpoint-3" / "optimizer.pt").is_file()  # it got that far ...
    assert not list(out.rglob(COMPLETE_MARKER)) and not list(out.rglob(MANIFEST))  # ... unmarked
    assert checkpoint.complete_checkpoints(out) == [] and not (out / "final").exists()
