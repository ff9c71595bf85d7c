"""A run resumed on another number of processes continues the same run (issue 17): with `global_batch_size`
kept, the steps after the resume train the same samples with the same optimizer state as the uninterrupted
2-process run, under ddp, ZeRO-2, ZeRO-3 and FSDP2.

Each chain starts from a 2-process launch of tests/launched.py (checkpoints at steps 2 and 4) as it would be
after a preemption following checkpoint-2 (a copy without the later checkpoint or the final model: the same
files a SIGTERM after that checkpoint leaves, without a timing-dependent kill). It resumes on 1 process,
saving every step (the saving cadence is not part of a run's identity), then its checkpoint-3 (written by 1
process) resumes on 2 processes again. Each resumed run must say what changed, run with the derived
accumulation, and match the uninterrupted run's per-step losses (LOSS_ATOL) and final weights (WEIGHT_ATOL):
the same tolerances and reasons as tests/test_distributed.py (the same fp32 sums in another order).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import copy_run, run_cli
from launched import LOSS_ATOL, WEIGHT_ATOL, final_weights, history, launch_args, trained
from sftdist.rundir import COMPLETE_MARKER

# strategy -> what it runs as on one process (ddp's one-process form is the plain single process).
ONE_PROCESS = {"ddp": "single", "zero2": "zero2", "zero3": "zero3", "fsdp2": "fsdp2"}


def stopped_at(run: Path, recipe: Path, dest: Path, step: int, **train: int) -> Path:
    """A copy of `run` as it was right after its checkpoint-`step` (later checkpoints and the final model
    gone), with `train` keys changed in its recipe; returns the copy's recipe."""
    new = copy_run(run, recipe, dest)
    for ckpt in dest.glob("checkpoint-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    raw = yaml.safe_load(new.read_text())
    raw["train"].update(train)
    new.write_text(yaml.safe_dump(raw))
    return new


def resume(recipe: Path, strategy: str, processes: int) -> str:
    args = launch_args(recipe, strategy)
    if strategy != "single":
        args[args.index("--num-processes") + 1] = str(processes)
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def assert_same_run(resumed: Path, ref: Path, from_step: int) -> None:
    losses, ref_losses = history(resumed)[0], history(ref)[0]
    assert max(abs(a - b) for a, b in zip(losses[from_step:], ref_losses[from_step:])) <= LOSS_ATOL, (losses, ref_losses)
    weights, ref_weights = final_weights(resumed), final_weights(ref)
    assert weights.keys() == ref_weights.keys()
    worst = max((weights[k].float() - ref_weights[k].float()).abs().max().item() for k in weights)
    assert worst <= WEIGHT_ATOL, worst


CHAINS = [("full", "ddp"), ("full", "zero2"), ("full", "zero3"), ("full", "fsdp2"), ("lora", "zero2")]


@pytest.mark.parametrize("method, strategy", CHAINS, ids=[f"{m}-{s}" for m, s in CHAINS])
def test_resume_on_one_process_then_on_two_continues_the_same_run(tmp_path, tmp_path_factory, tiny_model,
                                                                   demo_rows, method, strategy):
    run = trained(tmp_path_factory, tiny_model, demo_rows, method, strategy)
    zero = strategy.startswith("zero")
    conversion = "; ZeRO checkpoint converted to universal in " if zero else "\n"
    accumulation = 2 if strategy == "ddp" else 1  # per-device batch 1 under ddp, 2 otherwise

    # 2 processes -> 1: accumulation doubles, the global batch stays 4.
    one = tmp_path / "one"
    out = resume(stopped_at(run, run.parent / "recipe.yaml", one, 2, save_steps=1), ONE_PROCESS[strategy], 1)
    assert (f"sftdist: resuming from {one / 'checkpoint-2'}: step 2 written by 2 processes, now on 1 (global batch 4 "
            f"kept: accumulation {accumulation} -> {2 * accumulation}){conversion}") in out
    state = json.loads((one / "sftdist_run.json").read_text())["distributed"]
    assert (state["num_processes"], state["gradient_accumulation_steps"], state["global_batch"]) == (1, 2 * accumulation, 4)
    assert json.loads((one / "checkpoint-3" / COMPLETE_MARKER).read_text())["world_size"] == 1
    assert_same_run(one, run, 2)
    if zero:  # converted once into the checkpoint, atomically, and named for DeepSpeed's loader
        assert (one / "checkpoint-2" / "latest_universal").read_text() == "global_step2_universal"
        assert not list((one / "checkpoint-2").glob(".*partial*"))
    if method != "full":
        return

    # 1 process -> 2: from the checkpoint the one-process run wrote.
    two = tmp_path / "two"
    out = resume(stopped_at(one, one.parent / "one.yaml", two, 3), strategy, 2)
    assert (f"sftdist: resuming from {two / 'checkpoint-3'}: step 3 written by 1 process, now on 2 (global batch 4 "
            f"kept: accumulation {2 * accumulation} -> {accumulation}){conversion}") in out
    state = json.loads((two / "sftdist_run.json").read_text())["distributed"]
    assert (state["num_processes"], state["global_batch"]) == (2, 4)
    assert_same_run(two, run, 3)


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def refused(args: list[str], run: Path) -> str:
    """The one `error:` line a refused command prints; it must leave `run` exactly as it was."""
    before = snapshot(run)
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(run) == before
    return lines[0]


def test_resumes_that_cannot_continue_the_same_run_are_refused_in_one_line(tmp_path, tmp_path_factory, tiny_model,
                                                                            demo_rows):
    run = trained(tmp_path_factory, tiny_model, demo_rows, "full", "ddp")  # 2 processes x batch 1 x accumulation 2
    recipe = stopped_at(run, run.parent / "recipe.yaml", tmp_path / "copy", 2)
    copy = tmp_path / "copy"

    # A number of processes that global_batch_size 4 (batch 1) does not divide: refused before any process starts.
    line = refused(["launch", str(recipe), "--strategy", "ddp", "--num-processes", "3"], copy)
    assert line == (f"error: {recipe}: global_batch_size 4 with per_device_train_batch_size 1 needs a number of "
                    "processes whose data-parallel share divides 4: 1, 2, 4; got 3")

    # Another world size without global_batch_size: the run would silently train with another global batch.
    raw = yaml.safe_load(recipe.read_text())
    raw.pop("global_batch_size")
    raw["train"]["gradient_accumulation_steps"] = 2  # what the 2 processes ran: the same run, said another way
    (tmp_path / "accumulation.yaml").write_text(yaml.safe_dump(raw))
    line = refused(["train", str(tmp_path / "accumulation.yaml")], copy)
    assert line == (f"error: {copy / 'checkpoint-2'}: written by 2 processes with a global batch of 4; on 1 this run "
                    f"would train with 2. Set global_batch_size: 4 in {tmp_path / 'accumulation.yaml'} (each run then "
                    "derives its accumulation), or launch 2 processes")

    # Another strategy family: a ddp checkpoint has no ZeRO partitions (DeepSpeed used to fail with a traceback).
    line = refused(["launch", str(recipe), "--strategy", "zero2", "--num-processes", "2"], copy)
    assert line == (f"error: {copy / 'checkpoint-2'}: written under ddp/single (plain data parallelism), and this run "
                    "is DeepSpeed ZeRO-2; a checkpoint resumes only under the strategy that wrote it, at any number of "
                    f"processes: use --strategy ddp or single, or `sftdist export {copy / 'checkpoint-2'}` and start a "
                    "new run from the exported model")


def test_data_is_identified_by_its_content(tmp_path, tmp_path_factory, tiny_model, demo_rows):
    """A data source is its bytes, not its path or mtime: a `touch`, a re-staged copy (new inode and mtime, as
    a requeued slurm job stages it to scratch again), a symlink to an identical copy and a move (the recipe
    naming the new place) resume; rows appended to the training data are refused naming it; rows appended to
    the separate eval data only change what the eval loss is measured on (a warning)."""
    import os

    from conftest import decide
    from sftdist.recipe import load_recipe

    run = trained(tmp_path_factory, tiny_model, demo_rows, "full", "ddp")  # trained on demo_rows
    copy = tmp_path / "copy"
    recipe = stopped_at(run, run.parent / "recipe.yaml", copy, 2)

    def reads(path: Path) -> Path:
        raw = yaml.safe_load(recipe.read_text())
        raw["data"]["train"][0]["path"] = str(path)
        recipe.write_text(yaml.safe_dump(raw))
        return path

    def resumes() -> list[str]:
        claim = decide(load_recipe(recipe))
        assert (claim.action, claim.checkpoint) == ("resume", copy / "checkpoint-2")
        return claim.warnings

    data = reads(tmp_path / "moved" / "train.jsonl")  # moved: another path, the recipe names it
    data.parent.mkdir()
    shutil.copy(demo_rows, data)
    assert resumes() == []
    os.utime(data, (1e9, 2e9))  # touched
    assert resumes() == []
    linked = tmp_path / "elsewhere.jsonl"
    shutil.copy(data, linked)
    reads(tmp_path / "link.jsonl").symlink_to(linked)  # a symlink to an identical copy
    assert resumes() == []
    reads(data)
    staged = tmp_path / "staged.jsonl"  # staged again: a new file with the same bytes under the same name
    shutil.copy(demo_rows, staged)
    os.replace(staged, data)
    out = run_cli("train", str(recipe))  # the whole resume, on one process (global batch 4 kept)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"sftdist: resuming from {copy / 'checkpoint-2'}: step 2 written by 2 processes, now on 1" in out.stdout

    # A real change of the training rows: refused, naming the training data, and nothing written.
    recipe = stopped_at(run, run.parent / "recipe.yaml", tmp_path / "again", 2)
    reads(data)
    with data.open("a") as f:
        f.write(demo_rows.read_text().splitlines()[0] + "\n")
    line = refused(["train", str(recipe)], tmp_path / "again")
    assert line == (f"error: {tmp_path / 'again' / 'checkpoint-2'}: the training data (data.train) changed since it was "
                    "written, so its data position points into other rows; restore it, or pass --no-resume to start "
                    "over")


def test_a_run_saved_before_a_recipe_key_existed_resumes(tmp_path, tmp_path_factory, tiny_model, demo_rows):
    """The run's saved recipe as an older sftdist wrote it, without keys added since (save_dtype, eval_tasks,
    lora.target_parameters): it is compared with this version's defaults filled in, so it is the same run."""
    from conftest import decide
    from sftdist.recipe import load_recipe

    run = trained(tmp_path_factory, tiny_model, demo_rows, "full", "ddp")
    copy = tmp_path / "copy"
    recipe = stopped_at(run, run.parent / "recipe.yaml", copy, 2)
    saved = copy / "sftdist_recipe.yaml"
    raw = yaml.safe_load(saved.read_text())
    for key in ("save_dtype", "eval_tasks"):
        assert key in raw, key
        del raw[key]
    del raw["lora"]["target_parameters"]
    saved.write_text(yaml.safe_dump(raw))
    assert decide(load_recipe(recipe)).action == "resume"


def test_changed_eval_data_resumes_with_a_warning_and_an_older_encoding_is_refused(tmp_path, tmp_path_factory,
                                                                                    tiny_model, demo_rows):
    """A run with a separate eval file (its checkpoint's marker as `sftdist train` writes it for that recipe):
    rows appended to the eval file resume with a warning naming the eval data; a checkpoint of an older data
    encoding is refused naming the version."""
    from conftest import decide
    from sftdist.data.cache import ENCODING_VERSION, fingerprint_inputs
    from sftdist.model import load_tokenizer
    from sftdist.recipe import load_recipe
    from sftdist.resume import data_fingerprint

    run = trained(tmp_path_factory, tiny_model, demo_rows, "full", "ddp")
    copy = tmp_path / "copy"
    recipe = stopped_at(run, run.parent / "recipe.yaml", copy, 2)
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("\n".join(demo_rows.read_text().splitlines()[:4]) + "\n")
    for path in (recipe, copy / "sftdist_recipe.yaml"):  # the run as trained with this eval file
        raw = yaml.safe_load(path.read_text())
        raw["data"]["eval"] = [{**raw["data"]["train"][0], "path": str(held_out)}]
        path.write_text(yaml.safe_dump(raw))
    loaded = load_recipe(recipe)
    marker = copy / "checkpoint-2" / COMPLETE_MARKER
    written = json.loads(marker.read_text())
    fingerprint = data_fingerprint(fingerprint_inputs(loaded, lambda: load_tokenizer(loaded)))
    marker.write_text(json.dumps({**written, "data": fingerprint}))
    assert decide(loaded).warnings == []

    with held_out.open("a") as f:
        f.write(demo_rows.read_text().splitlines()[5] + "\n")
    claim = decide(load_recipe(recipe))
    assert claim.action == "resume" and claim.warnings == [
        f"warning: {copy / 'checkpoint-2'}: the eval data (data.eval) changed since it was written: eval losses "
        "before and after this resume are measured on other rows"]

    # Written by an sftdist of an older data encoding (a marker of before the version was recorded holds none).
    old = {k: v for k, v in fingerprint.items() if k != "version"}
    marker.write_text(json.dumps({**written, "data": old}))
    line = refused(["train", str(recipe)], copy)
    assert line == (f"error: {copy / 'checkpoint-2'}: written by an sftdist whose data encoding is version 3 (this one's "
                    f"is {ENCODING_VERSION}): its data position may point into other rows; finish the run with that "
                    "sftdist, or pass --no-resume to start over")


@pytest.mark.parametrize("marker, problem", [
    ("{not json", "sftdist_complete is not the JSON sftdist writes"),
    ('["a list"]', "sftdist_complete holds no global_step"),
    ("drop:data", "sftdist_complete lacks or garbles data"),
    ("drop:world_size+", "sftdist_complete lacks or garbles global_batch"),
])  # fmt: skip
def test_a_damaged_marker_is_one_line_never_a_silent_pass(tmp_path, tmp_path_factory, tiny_model, demo_rows, marker,
                                                          problem):
    """A marker that is not sftdist's, or lacks what it records, used to switch off every check of the resume
    (or fail with a KeyError): the checkpoint is not resumed, and with none older the refusal names the file."""
    run = trained(tmp_path_factory, tiny_model, demo_rows, "full", "ddp")
    copy = tmp_path / "copy"
    recipe = stopped_at(run, run.parent / "recipe.yaml", copy, 2)
    path = copy / "checkpoint-2" / COMPLETE_MARKER
    written = json.loads(path.read_text())
    if marker == "drop:data":
        marker = json.dumps({k: v for k, v in written.items() if k != "data"})
    elif marker == "drop:world_size+":
        marker = json.dumps({**written, "global_batch": "4"})
    path.write_text(marker)
    line = refused(["train", str(recipe)], copy)
    assert line == (f"error: {copy}: no checkpoint can be resumed ({copy / 'checkpoint-2'}: {problem}); pass "
                    "--no-resume to start over")


def test_universal_conversion_is_atomic_and_done_once(tmp_path, tmp_path_factory, tiny_model, demo_rows):
    import socket

    from sftdist import rundir
    from sftdist.resume import to_universal

    run = trained(tmp_path_factory, tiny_model, demo_rows, "full", "zero2")
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(run / "checkpoint-2", ckpt)
    # What a conversion killed midway leaves: its hidden build folder (of a pid that is gone) half-written,
    # and DeepSpeed's pointer to it.
    host = socket.gethostname().replace("-", "_")
    killed = ckpt / f".global_step2_universal.partial-{host}-999999999"
    (killed / "zero").mkdir(parents=True)
    (killed / "zero" / "half.pt").write_bytes(b"half")
    (ckpt / "latest_universal").write_text(killed.name)

    took = to_universal(ckpt)
    universal = ckpt / "global_step2_universal"
    assert took is not None and took > 0
    assert not killed.exists() and rundir.check_manifest(universal) is None
    assert (ckpt / "latest_universal").read_text() == universal.name
    assert {p.name for p in (universal / "zero").iterdir()} >= {"optimizer_state.pt", "model.norm.weight"}
    assert to_universal(ckpt) is None  # a second start finds it converted
    # A converted folder that lost a file since is converted again, never used.
    victim = universal / "zero" / "model.norm.weight" / "fp32.pt"
    victim.write_bytes(victim.read_bytes()[:10])
    assert to_universal(ckpt) is not None and rundir.check_manifest(universal) is None


# One conversion in a process of its own, as a resumed rank 0 runs it: a user error is one line, exit 2.
CONVERT = """
import sys
from pathlib import Path
from sftdist import preemption
from sftdist.errors import UserError
from sftdist.resume import to_universal
preemption.install()
ckpt = Path(sys.argv[1])
try:
    to_universal(ckpt)
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    print("kept" if (ckpt / "global_step2_universal" / "stale.pt").is_file() else "deleted")
    sys.exit(2)
"""


def test_sigterm_during_the_universal_conversion_is_one_line_and_leaves_no_conversion(tmp_path, tmp_path_factory,
                                                                                    tiny_model, demo_rows):
    """Before: 40 lines of the converter's traceback, then exit 75 though nothing was saved."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(trained(tmp_path_factory, tiny_model, demo_rows, "full", "zero2") / "checkpoint-2", ckpt)
    proc = subprocess.Popen([sys.executable, "-c", CONVERT, str(ckpt)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not list(ckpt.glob(".global_step2_universal.partial-*")):  # the converter has started
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines() == [
        f"sftdist: stopped by SIGTERM while converting {ckpt}/global_step2 to a universal checkpoint, before training "
        "began; nothing of it was saved: run the same command again"]
    assert not list(ckpt.glob(".global_step2_universal*")) and not (ckpt / "global_step2_universal").exists()


def test_too_little_space_to_convert_is_one_line_before_anything_is_deleted(tmp_path, tmp_path_factory, tiny_model,
                                                                           demo_rows):
    """Before: 84 lines, exit 1, with free space checked only after the partial copy was deleted. Here the checkpoint
    lies on a file system (a tmpfs of this test's own) with room for half of its conversion."""
    import subprocess
    import sys

    from conftest import REPO

    src = trained(tmp_path_factory, tiny_model, demo_rows, "full", "zero2") / "checkpoint-2"
    stale = tmp_path / "stale.pt"  # a damaged earlier conversion (no manifest): rebuilt, so deleted, if space allows
    stale.write_bytes(b"half")
    total = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    zero = sum(f.stat().st_size for f in (src / "global_step2").rglob("*") if f.is_file())
    size_kib = (total + zero // 2) // 1024 + 64
    fs = tmp_path / "fs"
    fs.mkdir()
    script = ('mount -t tmpfs -o size=$1k tmpfs "$0" && cp -r "$2" "$0/checkpoint-2" && '
              'mkdir "$0/checkpoint-2/global_step2_universal" && cp "$3" "$0/checkpoint-2/global_step2_universal/" && '
              'exec "$4" -c "$5" "$0/checkpoint-2"')
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(fs),
                           str(size_kib), str(src), str(stale), sys.executable, CONVERT],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "converting its ZeRO checkpoint to universal" in lines[0] and "GiB free" in lines[0], lines
    assert proc.stdout.strip() == "kept"
