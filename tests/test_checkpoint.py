"""Checkpoints resume exactly, incomplete ones are invisible, a signal saves and the next start
resumes, and export turns a checkpoint into a loadable model with the same weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_run, decide, run_cli
from sftdist import rundir
from sftdist.errors import EXIT_PREEMPTED, UserError
from sftdist.lock import LOCK_FILE
from sftdist.recipe import load_recipe
from sftdist.rundir import COMPLETE_MARKER, MANIFEST

DEMO = REPO / "sftdist" / "demo" / "train.jsonl"


def recipe(tmp_path: Path, model: Path, max_steps: int = 6, name: str = "run") -> Path:
    r = {
        "model": {"name_or_path": str(model)},
        "data": {"train": [{"path": str(DEMO), "limit": 400}], "max_length": 128},
        "train": {
            "max_steps": max_steps,
            "save_steps": 3,
            "logging_steps": 1,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "report_to": [],
        },
        "output_dir": str(tmp_path / name),
        "max_shard_size": "400KB",
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def losses(run: Path) -> list[float]:
    return [e["loss"] for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in e]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("ckpt")
    r = recipe(tmp, tiny_model)
    proc = run_cli("train", str(r))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return r, tmp / "run"


def test_checkpoints_are_marked_complete(uninterrupted):
    _, run = uninterrupted
    for step in (3, 6):
        marker = json.loads((run / f"checkpoint-{step}" / COMPLETE_MARKER).read_text())
        # The run that wrote it, for a resume at another world size (sftdist/resume.py).
        assert (marker["global_step"], marker["world_size"], marker["global_batch"]) == (step, 1, 4)
        assert (marker["distributed_type"], marker["gradient_accumulation_steps"]) == (None, 1)
        assert (run / f"checkpoint-{step}" / "optimizer.pt").is_file()
        assert (run / f"checkpoint-{step}" / "model.safetensors.index.json").is_file()
        assert len(list((run / f"checkpoint-{step}").glob("model-*.safetensors"))) >= 3  # max_shard_size
        ckpt = run / f"checkpoint-{step}"
        files = {str(p.relative_to(ckpt)): p.stat().st_size for p in ckpt.rglob("*")
                 if p.is_file() and p.name not in (MANIFEST, COMPLETE_MARKER)}
        assert json.loads((ckpt / MANIFEST).read_text()) == files and "optimizer.pt" in files
    assert not (run / LOCK_FILE).exists()  # released at the end of the run


def test_resume_reproduces_losses_exactly(tmp_path, uninterrupted):
    r, run = uninterrupted
    copy = tmp_path / "copy"
    r2 = copy_run(run, r, copy)
    # checkpoint-6 is marked complete but its optimizer state was cut short since (it used to be
    # resumed from, silently inexact or with a traceback): resume falls back to checkpoint-3.
    optimizer = copy / "checkpoint-6" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    # A kill mid-write of a later checkpoint: the directory exists but has no marker.
    (copy / "checkpoint-9").mkdir()
    (copy / "checkpoint-9" / "model.safetensors").write_bytes(b"partial")
    proc = run_cli("train", str(r2))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"warning: {copy / 'checkpoint-6'}: optimizer.pt has 1000 bytes, " in proc.stderr
    assert f"resuming from {copy / 'checkpoint-3'}" in proc.stdout
    assert losses(copy) == losses(run)  # exactly equal on CPU
    assert rundir.check_manifest(copy / "checkpoint-6") is None  # written again, whole


def test_optimizer_state_is_found_under_every_name_the_trainer_writes(tmp_path, uninterrupted):
    """optimizer.pt (plain), optimizer.bin (FSDP with a full state dict), optimizer_0/ (FSDP sharded): each
    resumes with its optimizer; a checkpoint with none resumes on schedule with the warning."""
    r, run = uninterrupted
    copy = tmp_path / "copy"
    recipe = load_recipe(copy_run(run, r, copy))
    ckpt = copy / "checkpoint-6"
    (ckpt / "optimizer.pt").rename(ckpt / "optimizer.bin")
    rundir.write_manifest(ckpt)
    claim = decide(recipe)
    assert (claim.checkpoint, claim.model_only, claim.warnings) == (ckpt, False, [])
    (ckpt / "optimizer.bin").unlink()
    rundir.write_manifest(ckpt)
    claim = decide(recipe)
    assert (claim.checkpoint, claim.model_only) == (ckpt, True)
    assert claim.warnings == [f"warning: {ckpt} holds the model only (train.save_only_model: true): resuming with "
                              "the learning-rate schedule at its step; the optimizer's moments start again from zero"]


def test_damaged_checkpoints_fall_back_and_none_left_is_one_line(tmp_path, uninterrupted):
    r, run = uninterrupted
    copy = tmp_path / "copy"
    recipe = load_recipe(copy_run(run, r, copy))
    (copy / "checkpoint-6" / "scheduler.pt").unlink()
    claim = decide(recipe)
    assert (claim.action, claim.checkpoint) == ("resume", copy / "checkpoint-3")
    assert claim.warnings == [f"warning: {copy / 'checkpoint-6'}: scheduler.pt is missing; falling back to checkpoint-3"]
    state = copy / "checkpoint-3" / "trainer_state.json"
    state.write_text(state.read_text()[:-10])
    with pytest.raises(UserError) as e:
        decide(recipe)
    assert str(e.value) == (
        f"{copy}: no checkpoint can be resumed ({copy / 'checkpoint-6'}: scheduler.pt is missing; "
        f"{copy / 'checkpoint-3'}: trainer_state.json has {state.stat().st_size} bytes, "
        f"{state.stat().st_size + 10} were written); pass --no-resume to start over"
    )
    # A checkpoint written before manifests existed (marker, no manifest) is vouched for by its marker.
    (copy / "checkpoint-6" / rundir.MANIFEST).unlink()
    assert decide(recipe).checkpoint == copy / "checkpoint-6"


def test_run_stopped_at_its_last_step_finishes_without_training_and_a_rerun_does_nothing(tmp_path, uninterrupted):
    """checkpoint-6 of a 6-step run without final/ (a SIGTERM in the last step, or a kill during the final
    save): the next start writes final/ from it; starting a finished run again changes nothing."""
    from safetensors.torch import load_file

    r, run = uninterrupted
    copy = tmp_path / "copy"
    r2 = copy_run(run, r, copy)
    proc = run_cli("train", str(r2))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming from {copy / 'checkpoint-6'}" in proc.stdout
    assert sorted(p.name for p in copy.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]  # no step 7
    assert losses(copy) == losses(run)
    ckpt = {k: v for f in (copy / "checkpoint-6").glob("model-*.safetensors") for k, v in load_file(f).items()}
    final = {k: v for f in (copy / "final").glob("model-*.safetensors") for k, v in load_file(f).items()}
    assert final.keys() == ckpt.keys() and all(final[k].equal(ckpt[k]) for k in final)

    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    again = run_cli("train", str(r2))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"sftdist: {copy} is a finished run of this recipe ({copy / 'final'}); nothing to do" in again.stdout
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_other_recipe_in_output_dir_is_refused(tmp_path, uninterrupted):
    r, run = uninterrupted
    raw = yaml.safe_load(r.read_text())
    raw["train"]["learning_rate"] = 5e-4
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    before = sorted(p.name for p in run.iterdir())
    cache = tmp_path / "cache"
    proc = run_cli("train", str(other), env={"SFTDIST_CACHE": str(cache)})
    assert proc.returncode == 2
    assert "holds another recipe's run" in proc.stderr and "--overwrite" in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == before
    assert not cache.exists()  # refused before any data was prepared (it used to be after data and model)


def test_starting_over_removes_only_what_sftdist_wrote(tmp_path, uninterrupted):
    """--no-resume used to delete every file of output_dir whose name starts with `final`."""
    r, run = uninterrupted
    copy = tmp_path / "copy"
    r2 = copy_run(run, r, copy)
    mine = {"final_eval.json": "{}", "finalists.txt": "a\nb\n", "final_report.md": "# report\n"}
    for name, text in mine.items():
        (copy / name).write_text(text)
    (copy / ".final.partial-ranks").mkdir()  # a final save killed midway: sftdist's own leftover
    proc = run_cli("train", str(r2), "--no-resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming" not in proc.stdout
    assert {name: (copy / name).read_text() for name in mine} == mine
    assert not (copy / ".final.partial-ranks").exists()
    assert losses(copy) == losses(run)  # trained again from the start


def test_a_checkpoint_without_optimizer_state_resumes_on_schedule_and_says_so(tmp_path, tiny_model):
    """`train.save_only_model: true` checkpoints hold no optimizer or scheduler: the resume used to restart the
    learning rate from its first step, silently."""
    r = recipe(tmp_path, tiny_model, max_steps=6)
    raw = yaml.safe_load(r.read_text())
    raw["train"].update(save_only_model=True, lr_scheduler_type="linear")
    r.write_text(yaml.safe_dump(raw))
    assert run_cli("train", str(r)).returncode == 0
    run = tmp_path / "run"
    assert not (run / "checkpoint-3" / "optimizer.pt").exists() and not (run / "checkpoint-3" / "scheduler.pt").exists()
    r2 = copy_run(run, r, tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "checkpoint-6")
    proc = run_cli("train", str(r2))
    assert proc.returncode == 0, proc.stderr[-2000:]
    warning = (f"warning: {tmp_path / 'copy' / 'checkpoint-3'} holds the model only (train.save_only_model: true): "
               "resuming with the learning-rate schedule at its step; the optimizer's moments start again from zero")
    assert warning in proc.stderr.splitlines()

    def rates(path: Path) -> list[float]:
        return [e["learning_rate"] for e in json.loads((path / "trainer_state.json").read_text())["log_history"]
                if "loss" in e]

    assert rates(tmp_path / "copy") == rates(run)  # steps 4-6 on the schedule, not from its start


def test_sigterm_saves_then_next_start_resumes(tmp_path, tiny_model):
    r = recipe(tmp_path, tiny_model, max_steps=40)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftdist", "train", str(r)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 300
    for line in proc.stdout:
        if "'loss'" in line or '"loss"' in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == EXIT_PREEMPTED, rest[-2000:]
    run = tmp_path / "run"
    ckpts = sorted(run.glob("checkpoint-*"))
    assert ckpts and all((c / COMPLETE_MARKER).is_file() for c in ckpts)
    assert not (run / "final").exists()
    step = int(ckpts[-1].name.split("-")[1])
    assert 0 < step < 40
    # The next start resumes from it (a short max_steps override would change the recipe; run on).
    resumed = run_cli("train", str(r), env={"PYTHONUNBUFFERED": "1"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {ckpts[-1]}" in resumed.stdout
    assert (run / "final" / "model.safetensors.index.json").is_file()


def test_export_full_checkpoint_matches_weights(tmp_path, uninterrupted):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run = uninterrupted
    out = tmp_path / "exported"
    proc = run_cli("export", str(run / "checkpoint-6"), "--out", str(out), "--max-shard-size", "200KB")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) >= 4
    model = AutoModelForCausalLM.from_pretrained(out)
    saved = {}
    for shard in (run / "checkpoint-6").glob("model-*.safetensors"):
        saved.update(load_file(str(shard)))
    state = model.state_dict()
    assert state.keys() == saved.keys()  # every tensor exported, none missing or extra
    for name, tensor in state.items():
        assert torch.equal(tensor, saved[name]), name
    tok = AutoTokenizer.from_pretrained(out)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.chat_template


def test_export_refuses_incomplete_checkpoint_and_leaves_nothing(tmp_path, uninterrupted):
    _, run = uninterrupted
    broken = tmp_path / "checkpoint-3"
    shutil.copytree(run / "checkpoint-3", broken)
    (broken / COMPLETE_MARKER).unlink()
    out = tmp_path / "out"
    proc = run_cli("export", str(broken), "--out", str(out))
    assert proc.returncode == 2 and "incomplete" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
