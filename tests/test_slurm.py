"""launch/slurm: shellcheck passes, #SBATCH lines are literals, and the script's own logic runs a
job on this machine: started on one "node", a preemption signal makes it checkpoint and the job
requeue itself; the requeued job gets two "nodes", whose two `sftdist launch` processes (one per
node, as srun starts them) join one gloo group of world size 2, resume with the global batch kept,
train to the end and save once.

slurm itself is not here, so `srun` and `scontrol` are small stand-ins written below: srun starts
its command once per node with the variables slurm sets per task; scontrol lists the nodes and
records a requeue. Everything the script does between them is the real thing."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SCRIPTS = sorted((REPO / "launch").rglob("*.sbatch")) + sorted((REPO / "launch").rglob("*.sh"))
SBATCH = REPO / "launch" / "slurm" / "sft.sbatch"
DEMO_TRAIN = REPO / "sftdist" / "demo" / "train.jsonl"

FAKE_SRUN = """#!/usr/bin/env bash
# One task per node, as `srun --ntasks-per-node=1` starts them, with slurm's per-task variables and
# (as on separate nodes) CPUs of its own.
while [[ $1 == -* ]]; do shift; done
cpus=$(nproc)
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 SLURM_STEP_ID=0 taskset -c $((node % cpus)) "$@" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
    wait "$pid"; code=$?
    if ((code > rc)); then rc=$code; fi
done
exit "$rc"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
    "show hostnames") tr ',' '\\n' <<<"$3" ;;
    "requeue "*) echo "$2" >>"$SCONTROL_LOG" ;;
    *) exit 1 ;;
esac
"""


def test_shellcheck_passes_on_every_script():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert SCRIPTS, "no scripts found under launch/"
    proc = subprocess.run([str(shellcheck), *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_sbatch_lines_are_literals():
    lines = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert any("--signal=USR1@" in line for line in lines) and "#SBATCH --requeue" in lines
    assert not [line for line in lines if "$" in line or "`" in line]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """PATH with srun/scontrol stand-ins and the variables of a 2-node allocation."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "localhost,localhost",
        "SLURM_CPUS_PER_TASK": "1",
        "SFTDIST_PROCS_PER_NODE": "1",
        "SFTDIST_MAIN_PORT": str(free_port()),
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
    }


def step_processes(root: int) -> list:
    """What slurm signals before the time limit: every process of the step (not srun, not the batch shell)."""
    import psutil

    return [p for p in psutil.Process(root).children(recursive=True) if "srun" not in " ".join(p.cmdline())]


def test_job_requeued_on_more_nodes_resumes_as_one_group_with_the_same_global_batch(tmp_path, tiny_model, fake_slurm):
    """A job that started on 1 node is preempted and requeued on 2 (the allocation it got): the script
    resumes it there, as one group of 2, with the recipe's global batch kept (issue 17)."""
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model)},
        "data": {"train": [{"path": str(DEMO_TRAIN), "limit": 200}], "max_length": 64},
        "train": {"max_steps": 30, "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 1000,
                  "report_to": []},
        "global_batch_size": 4,
        "output_dir": str(run),
    }))
    cmd = ["bash", str(SBATCH), str(recipe), "ddp"]
    one_node = {**fake_slurm, "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost"}

    # First start, on 1 node: stop it with the time-limit signal as soon as it trains.
    job = subprocess.Popen(cmd, env=one_node, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in job.stdout:
        out.append(line)
        if line.startswith("sftdist: {"):
            first = json.loads(line.removeprefix("sftdist: "))
            time.sleep(1)
            for p in step_processes(job.pid):
                p.send_signal(signal.SIGUSR1)
            break
    out += job.stdout.readlines()
    assert job.wait(timeout=300) == 75, "".join(out)[-3000:]
    assert (first["num_processes"], first["gradient_accumulation_steps"], first["global_batch"]) == (1, 2, 4)
    assert Path(fake_slurm["SCONTROL_LOG"]).read_text().split() == ["4242"]
    ckpts = [p for p in run.glob("checkpoint-*") if (p / "sftdist_complete").is_file()]
    assert len(ckpts) == 1 and not (run / "final").exists(), "".join(out)[-3000:]
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 0 < stopped_at < 30

    # The requeued job got 2 nodes: same script; it resumes as one group of 2 and finishes.
    proc = subprocess.run(cmd, env={**fake_slurm, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True,
                          timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert (f"sftdist: resuming from {ckpts[0]}: step {stopped_at} written by 1 process, now on 2 (global batch 4 "
            "kept: accumulation 2 -> 1)") in log
    assert log.count("sftdist: saved ") == 1  # one save for the whole group, not one per node
    info = json.loads((run / "sftdist_run.json").read_text())["distributed"]
    assert info["distributed_type"] == "MULTI_CPU" and info["backend"] == "gloo"
    assert (info["num_processes"], info["num_machines"], info["global_batch"]) == (2, 2, 4)
    assert info["gradient_accumulation_steps"] == 1
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    assert (run / "final" / "model.safetensors").is_file()
    assert not Path(fake_slurm["SCONTROL_LOG"]).read_text().split()[1:]  # no second requeue
    assert re.search(r"sftdist\.sbatch: job 4242 \(restart 1\), 2 node\(s\), main localhost:\d+", log)
