"""The command line's front door: a bare `sftdist`, `sftdist env`, and one name for one thing across
`plan` and `launch`."""

from __future__ import annotations

import re
from importlib import metadata

from conftest import REPO, run_cli

FIXTURE_RECIPE = str(REPO / "recipes" / "dolly-gpt2-fixture.yaml")


def test_bare_sftdist_prints_usage_and_exits_0() -> None:
    out = run_cli()
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.startswith("Usage: ") and "Commands:" in out.stdout
    for command in ("train", "launch", "plan", "recipes", "env"):
        assert re.search(rf"^\s+{command}\s", out.stdout, re.M), command


def test_env_reports_versions_gpus_and_the_auto_strategy() -> None:
    """Every version the issue template asks for, as installed; the GPUs (none here); and, given a recipe,
    the same pick `launch --strategy auto` makes."""
    bare = run_cli("env", env={"CUDA_VISIBLE_DEVICES": ""})
    assert bare.returncode == 0, bare.stderr
    fields = dict(line.split(": ", 1) for line in bare.stdout.splitlines())
    for dist in ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "bitsandbytes"):
        assert fields[dist] == metadata.version(dist), dist
    assert fields["flash-attn"] in ("not installed", *([metadata.version("flash-attn")] if _has("flash-attn") else []))
    assert fields["python"].split()[0] == ".".join(map(str, __import__("sys").version_info[:3]))
    assert fields["torch CUDA"].endswith("available: no")
    assert fields["gpus"] == "none visible"
    assert "pass a recipe" in fields["strategy auto"]

    with_recipe = run_cli("env", FIXTURE_RECIPE, "--num-processes", "2", env={"CUDA_VISIBLE_DEVICES": ""})
    launch = run_cli("launch", FIXTURE_RECIPE, "--strategy", "auto", "--num-processes", "2", "--dry-run",
                     env={"CUDA_VISIBLE_DEVICES": ""})
    assert with_recipe.returncode == 0 and launch.returncode == 0, (with_recipe.stderr, launch.stderr)
    chose = re.search(r"--strategy auto chose (\S+):", launch.stderr).group(1)
    assert f"strategy auto: {chose} x 2 process(es) per machine" in with_recipe.stdout

    no_processes = run_cli("env", FIXTURE_RECIPE, env={"CUDA_VISIBLE_DEVICES": ""})
    assert no_processes.returncode == 0
    assert "strategy auto: cannot choose: --strategy auto: no GPU is visible; pass --num-processes" in no_processes.stdout


def _has(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def test_plan_and_launch_share_option_names_with_help() -> None:
    plan, launch = run_cli("plan", "--help"), run_cli("launch", "--help")
    for out in (plan, launch):
        assert out.returncode == 0
        for option in ("--num-processes", "--num-machines"):
            line = re.search(rf"^\s+{option}\b.*$", out.stdout, re.M).group(0)
            assert len(line.split(None, 2)) == 3, f"{option} has no help text: {line!r}"
    assert "--gpus" not in plan.stdout and "--nodes" not in plan.stdout  # the old names are hidden aliases


def test_plan_old_and_new_names_give_the_same_plan() -> None:
    new = run_cli("plan", FIXTURE_RECIPE, "--num-processes", "2", "--num-machines", "2", "--gpu-memory", "8GiB")
    old = run_cli("plan", FIXTURE_RECIPE, "--gpus", "2", "--nodes", "2", "--gpu-memory", "8GiB")
    assert new.returncode == 0 and new.stdout == old.stdout, new.stderr
    assert "2 node(s) x 2 GPU(s)" in new.stdout
    missing = run_cli("plan", FIXTURE_RECIPE, "--gpu-memory", "8GiB")
    assert missing.returncode == 2 and missing.stderr == "error: sftdist plan: missing --num-processes N (GPUs per machine)\n"
