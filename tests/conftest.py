"""Shared test fixtures: the offline environment, the fixtures inside tests/fixtures, the tiny model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# Prepared data of this test session (data/cache.py), never the user's ~/.cache.
os.environ["SFTDIST_CACHE"] = tempfile.mkdtemp(prefix="sftdist-test-cache-")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # inside the project, so a bare clone's suite passes
DOLLY = FIXTURES / "dolly-300" / "train.jsonl"
GPT2_TINY = FIXTURES / "gpt2-tiny-random"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default model (`sftdist make-tiny-model`), built once per test session."""
    from sftdist.tiny import make_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model(str(out), seed=0)
    return out


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Path]:
    """One tiny random model per architecture of tests/families.py, with the tiny model's tokenizer, built once."""
    from families import build_families
    from transformers import AutoTokenizer

    return build_families(tmp_path_factory.mktemp("families"), AutoTokenizer.from_pretrained(tiny_model))


@pytest.fixture(scope="session")
def demo_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 demo rows, copied once so that every launched run of the session reads the same bytes."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with (REPO / "sftdist" / "demo" / "train.jsonl").open(encoding="utf-8") as f:
        path.write_text("".join(f.readline() for _ in range(64)), encoding="utf-8")
    return path


def copy_run(run: Path, recipe: Path, dest: Path) -> Path:
    """Copy the finished run `run` of `recipe` to `dest` as if it had stopped after its last checkpoint
    (no final model, trainer state or run info); return a recipe whose output_dir is `dest`."""
    shutil.copytree(run, dest)
    for name in ("final", "trainer_state.json", "sftdist_run.json"):
        path = dest / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    new = dest.parent / f"{dest.name}.yaml"
    new.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "output_dir": str(dest)}))
    # The run's own copy of its recipe names the old output_dir; it must match the new recipe to resume.
    saved = dest / "sftdist_recipe.yaml"
    saved.write_text(saved.read_text().replace(str(run), str(dest)))
    return new


def decide(recipe, resume: bool = True, overwrite: bool = False):
    """`checkpoint.decide` for `recipe` as a one-process `sftdist train` of it would call it."""
    from sftdist import checkpoint
    from sftdist.data.cache import fingerprint_inputs
    from sftdist.model import load_tokenizer
    from sftdist.resume import data_fingerprint, planned

    facts = planned(recipe, data_fingerprint(fingerprint_inputs(recipe, lambda: load_tokenizer(recipe))))
    return checkpoint.decide(recipe, facts, resume=resume, overwrite=overwrite)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600, prefix: tuple = ()):
    """Run the real `sftdist` CLI in a subprocess (as a user would) and return the CompletedProcess;
    `prefix` is a command that runs it (e.g. `unshare ...` for a mount namespace of its own)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "sftdist", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def signal_at_first_loss(proc: "subprocess.Popen", signum: int, timeout: int = 300) -> None:
    """Send `signum` to `proc` (text stdout) once it logs its first loss: a stop in the middle of training."""
    import time

    deadline = time.time() + timeout
    for line in proc.stdout:
        if "'loss'" in line:
            proc.send_signal(signum)
            return
        assert time.time() < deadline
