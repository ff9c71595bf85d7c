"""`sftdist eval` and the recipe's `eval_tasks`, offline on local lm-eval tasks.

One short full run on eight demo rows (tests/fixtures/eval_tasks/rows.jsonl, the task `memo_gen`) is shared:
it evaluates its tasks at each save during training, then `sftdist eval` puts it, its checkpoints and its
base in one table, on the fixture task, the shipped demo tasks and the same rows as a prompts file, and
`sftdist generate --compare` must report the same exact match for those prompts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import FIXTURES, REPO, run_cli

TASKS = FIXTURES / "eval_tasks"
ROWS = TASKS / "rows.jsonl"


def write_recipe(tmp_path: Path, model: Path, name: str, **extra) -> Path:
    recipe = {
        "model": {"name_or_path": str(model)},
        "method": extra.pop("method", "full"),
        "data": {"train": [{"path": str(ROWS), "format": "dolly"}], "max_length": 64},
        "train": {
            "max_steps": 80,
            "per_device_train_batch_size": 2,
            "learning_rate": 2e-3,
            "lr_scheduler_type": "constant",
            "logging_steps": 10,
            "save_steps": 40,
            "report_to": [],
            **extra.pop("train", {}),
        },
        "output_dir": str(tmp_path / name),
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A full run that learns the eight rows, evaluating `memo_gen` at each of its two saves."""
    tmp = tmp_path_factory.mktemp("eval")
    recipe = write_recipe(tmp, tiny_model, "run", eval_tasks={"tasks": ["memo_gen"], "include_path": str(TASKS)})
    proc = run_cli("train", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


def table_row(stdout: str, task: str, metric: str) -> list[str]:
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[:2] == [task, metric]:
            return cells[2:]
    raise AssertionError(f"no row {task} {metric} in:\n{stdout}")


def test_eval_puts_run_checkpoints_and_base_in_one_table(trained: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = run_cli("eval", str(trained), "--compare", str(tiny_model), "--checkpoints", "--include-path", str(TASKS),
                   "--tasks", "memo_gen,sftdist_demo_mc", "--limit", "8", "--prompts-file", str(ROWS),
                   "--max-new-tokens", "16", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["models"]) == ["base", "checkpoint-40", "checkpoint-80", "final"]
    assert report["prompt_style"].startswith("prompts rendered through the prompt template 'default'")
    res = report["results"]
    gen = {col: res[col]["memo_gen"]["exact_match"] for col in report["models"]}
    assert gen["base"]["value"] == 0.0
    assert gen["final"]["value"] >= 0.75, gen  # far above the base
    assert gen["final"]["stderr"] is not None
    # The lm-eval task and the prompts file ask the same questions, rendered alike: the same answers.
    for col in report["models"]:
        assert res[col]["rows.jsonl"]["exact_match"]["value"] == gen[col]["value"]
    mc = res["final"]["sftdist_demo_mc"]["acc"]
    assert 0.0 <= mc["value"] <= 1.0 and mc["stderr"] is not None
    # The printed table has the same figures, one column per model.
    assert table_row(proc.stdout, "memo_gen", "exact_match")[-1].startswith(f"{gen['final']['value']:.4f} ± ")

    # `generate --compare` reports the same exact match on the same prompts (sftdist.metrics, one code).
    proc = run_cli("generate", str(trained / "final"), "--compare", str(tiny_model), "--prompts-file", str(ROWS),
                   "--greedy", "--max-new-tokens", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"exact-match accuracy (fine-tuned): {gen['final']['value']:.1%} of 8" in proc.stdout
    assert "exact-match accuracy (base): 0.0% of 8" in proc.stdout


def test_eval_during_training_logs_beside_eval_loss_and_matches_sftdist_eval(trained: Path) -> None:
    info = json.loads((trained / "sftdist_run.json").read_text())
    rows = info["eval_tasks"]
    assert [r["step"] for r in rows] == [40, 80]
    assert all(0.0 <= r["eval_memo_gen_exact_match"] <= 1.0 and "eval_memo_gen_exact_match_stderr" in r for r in rows)
    assert all(r["eval_tasks_seconds"] > 0 for r in rows)  # its cost, logged with it
    state = json.loads((trained / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "eval_memo_gen_exact_match" in e]
    assert [e["step"] for e in logged] == [40, 80]
    # The weights in memory at step 80 are checkpoint-80's: `sftdist eval` of it gives the same figure.
    proc = run_cli("eval", str(trained / "checkpoint-80"), "--include-path", str(TASKS), "--tasks", "memo_gen")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert table_row(proc.stdout, "memo_gen", "exact_match")[0].startswith(f"{rows[-1]['eval_memo_gen_exact_match']:.4f}")


def test_lora_run_is_evaluated_through_its_adapter(tmp_path: Path, tiny_model: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_model, "lora", method="lora", lora={"r": 16, "alpha": 32, "dropout": 0.0},
                          train={"learning_rate": 1e-2},
                          eval_tasks={"tasks": ["memo_gen"], "include_path": str(TASKS), "every_n_saves": 2})
    proc = run_cli("train", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = tmp_path / "lora" / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").exists()
    # every_n_saves: 2 of the saves at steps 40 and 80: once, on the peft model being trained.
    (trained,) = json.loads((tmp_path / "lora" / "sftdist_run.json").read_text())["eval_tasks"]
    assert trained["step"] == 80
    out = tmp_path / "report.json"
    proc = run_cli("eval", str(tmp_path / "lora"), "--compare", str(tiny_model), "--include-path", str(TASKS),
                   "--tasks", "memo_gen", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    base, adapted = (res[col]["memo_gen"]["exact_match"]["value"] for col in ("base", "final"))
    assert base == 0.0 and adapted > base  # the adapter's answers, not the base's
    assert adapted == trained["eval_memo_gen_exact_match"]  # the adapter over its base is the model that trained


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("bad task", ["--tasks", "no_such_task"], "unknown lm-eval task 'no_such_task'"),
        ("bad path", ["--tasks", "sftdist_demo_gen"], "no such model or run directory"),
        ("not a run", ["--tasks", "sftdist_demo_gen"], "is neither a model directory"),
        ("nothing", [], "nothing to evaluate"),
    ],
)
def test_user_mistakes_are_one_line_with_exit_2(tmp_path: Path, tiny_model: Path, case: str, args: list[str],
                                                message: str) -> None:
    target = {"bad path": tmp_path / "absent", "not a run": tmp_path}.get(case, tiny_model)
    proc = run_cli("eval", str(target), *args, "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_missing_lm_eval_is_one_line_naming_the_extra(tmp_path: Path, tiny_model: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "lm_eval.py").write_text("raise ImportError(\"No module named 'lm_eval'\")\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    proc = run_cli("eval", str(tiny_model), "--tasks", "sftdist_demo_gen", env=env)
    assert proc.returncode == 2
    assert proc.stderr == "error: lm-eval tasks need EleutherAI's lm-evaluation-harness, which is not installed: " \
                          "pip install 'sftdist[eval]'\n"


def test_recipe_eval_tasks_are_checked_when_the_recipe_loads(tmp_path: Path, tiny_model: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_model, "bad", eval_tasks={"tasks": ["memo_gen"], "every_n_saves": 0})
    proc = run_cli("data", str(recipe), "--check")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {recipe}: eval_tasks.every_n_saves is 0; expected at least 1"
    recipe = write_recipe(tmp_path, tiny_model, "typo", eval_tasks={"tasks": ["no_such_task"]})
    proc = run_cli("train", str(recipe))
    assert proc.returncode == 2
    assert "unknown lm-eval task 'no_such_task'" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "typo").exists()  # refused before the run touched output_dir


@pytest.mark.parametrize("chat", [True, False])
def test_task_prompts_reach_the_model_as_generate_renders_them(tiny_model: Path, chat: bool) -> None:
    """lm-eval's request for a task prompt is tokenized to the ids `sftdist generate` gives the same text: a user
    turn of the chat template for a chat-trained run, the prompt template for an instruction run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftdist.data.encode import Encoder, stop_token_ids
    from sftdist.data.templates import PROMPT_TEMPLATES
    from sftdist.evaluation import make_lm
    from sftdist.prompt_style import PromptStyle

    tok = AutoTokenizer.from_pretrained(tiny_model)
    lm = make_lm(AutoModelForCausalLM.from_pretrained(tiny_model), tok, PromptStyle(chat, "alpaca", "test"), 1)
    question = "What is the first word?\n\nrain\ndoor"
    context = lm.apply_chat_template([{"role": "user", "content": question}])
    ids = lm.tok_batch_encode([context])[0][0].tolist()
    enc = Encoder(tok, 10**9, "completion", False, stop_token_ids(tok))
    if chat:
        expected = enc.chat_prompt_ids([{"role": "user", "content": question}])
    else:
        expected = enc.prompt_ids(PROMPT_TEMPLATES["alpaca"].render(question))
        assert context.startswith("Below is an instruction") and context.endswith("### Response:\n")
    assert ids == expected
    assert ids.count(tok.bos_token_id) <= 1


def test_metrics_score_answers_against_references() -> None:
    from sftdist.metrics import score

    refs = ["the cat sat on the mat", "84"]
    assert score("exact_match", ["the  cat sat on the mat\n", "85"], refs) == (0.5, 0.5)
    for metric in ("rouge", "bleu", "chrf"):
        assert score(metric, refs, refs)[0] == pytest.approx(1.0)
    assert score("rouge", ["dog", "12"], refs) == (0.0, 0.0)
    half = score("rouge", ["the cat sat", "84"], refs)[0]
    assert half == pytest.approx((2 * 1 * 0.5 / 1.5 + 1.0) / 2)  # ROUGE-L F1 of a prefix of half the words, and 1


@pytest.mark.parametrize("eval_tasks", [None, {"tasks": ["sftdist_demo_mc"], "every_n_saves": 3}])
def test_eval_tasks_never_block_a_resume(trained: Path, tmp_path: Path, eval_tasks: dict | None) -> None:
    """Removing or changing eval_tasks resumes the same run from its last checkpoint."""
    from conftest import copy_run, decide

    from sftdist.recipe import load_recipe

    path = copy_run(trained, trained.parent / "run.yaml", tmp_path / "copy")
    raw = yaml.safe_load(path.read_text())
    if eval_tasks is None:
        raw.pop("eval_tasks")
    else:
        raw["eval_tasks"] = eval_tasks
    path.write_text(yaml.safe_dump(raw))
    claim = decide(load_recipe(path))
    assert (claim.action, claim.checkpoint) == ("resume", tmp_path / "copy" / "checkpoint-80")


def test_eval_launched_on_two_processes_splits_the_requests_and_agrees(trained: Path, tmp_path: Path) -> None:
    """`accelerate launch -m sftdist eval` (here 2 CPU processes, a gloo group as `sftdist launch` builds it): lm-eval
    splits the requests over both, rank 0 prints one table and writes the JSON, with the one-process figures."""
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / "ddp.yaml"),
           "--num_processes", "2", "--num_machines", "1", "-m", "sftdist", "eval", str(trained / "final"),
           "--include-path", str(TASKS), "--tasks", "memo_gen", "--out", str(out)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["processes"] == 2
    alone = json.loads((trained / "sftdist_run.json").read_text())["eval_tasks"][-1]["eval_memo_gen_exact_match"]
    assert report["results"]["final"]["memo_gen"]["exact_match"]["value"] == alone
    assert proc.stdout.count("memo_gen") == 1  # one table, from rank 0
