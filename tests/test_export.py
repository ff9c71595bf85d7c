"""What travels with the models a run writes, and what export and generate do when their inputs
change under them or ask for too much (the one-line refusals of damaged inputs are in test_errors).

- The run's recipe and prompt style go into every checkpoint, `final/`, export and merged export, so
  `generate` renders prompts as training did from any of them, with the data files gone.
- A checkpoint that a running training rotates away while it is exported is one line, and nothing
  is left behind.
- `generate --max-new-tokens` stops at the model's context (one warning line), instead of failing
  past it or running for minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import GPT2_TINY, REPO, run_cli
from sftdist.rundir import MANIFEST, PROMPT_FILE, RUN_FILES

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
    for w in ("yes", "no", "maybe", "never")
]
CHAT_PROMPT = "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # the tiny model's template


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A LoRA run on chat rows only, with checkpoints at steps 1 and 2; its data file is deleted after
    training, as on a machine the model was copied to."""
    d = tmp_path_factory.mktemp("chat-run")
    data = d / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    recipe = {
        "model": {"name_or_path": str(tiny_model)},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": [{"path": str(data)}], "max_length": 64},
        "train": {"max_steps": 2, "save_steps": 1, "per_device_train_batch_size": 2, "report_to": []},
        "output_dir": str(d / "run"),
    }
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = run_cli("train", str(d / "recipe.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data.unlink()
    return d / "run"


def test_every_model_of_a_chat_run_renders_prompts_with_its_chat_template(chat_run: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    from sftdist import prompt_style
    from sftdist.generate import read_prompts

    ckpt = chat_run / "checkpoint-1"
    assert PROMPT_FILE in json.loads((ckpt / MANIFEST).read_text())  # verified like every file of the checkpoint
    exported, merged = tmp_path / "exported", tmp_path / "merged"
    with ThreadPoolExecutor(max_workers=3) as pool:
        exports = list(pool.map(lambda args: run_cli("export", str(ckpt), *args), [
            ("--out", str(exported)), ("--out", str(merged), "--merge")]))
        for proc in exports:
            assert proc.returncode == 0, proc.stderr[-3000:]
        for d in (exported, merged):
            for name in RUN_FILES:
                assert (d / name).read_bytes() == (chat_run / name).read_bytes(), (d, name)
        answered = [ckpt, merged]  # an adapter and a full model, both used to render `### Instruction:` prompts
        generated = list(pool.map(
            lambda d: run_cli("generate", str(d), "--prompt", "hi", "--max-new-tokens", "1", "--greedy"), answered))
    for d, proc in zip(answered, generated):
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = f"sftdist generate: prompts rendered as a user turn of the chat template ({d / PROMPT_FILE})"
        assert line in proc.stderr.splitlines(), proc.stderr[-3000:]
    for d in (ckpt, chat_run / "final", exported, merged):
        tok = AutoTokenizer.from_pretrained(d)
        (prompt,) = read_prompts(None, ["hi"], prompt_style.read(d), tok)
        assert tok.decode(prompt.ids) == CHAT_PROMPT, d


def test_export_of_a_checkpoint_rotated_away_midway_is_one_line(chat_run: Path, tmp_path: Path):
    """The checkpoint is deleted (as rotation does) after export checked it, while it builds --out."""
    ckpt = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(chat_run / "checkpoint-2", ckpt)
    out = tmp_path / "new" / "exported"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "workers" / "stop_before_build.py"), "export", str(ckpt), "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), "export ended before building --out"
    shutil.rmtree(ckpt)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"error: {ckpt}: ") and "vanished while exporting" in lines[0], lines[0]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no --out, no parent made for it, no hidden build


def test_generate_stops_at_the_models_context(tmp_path: Path):
    """A GPT-2 has no position past its context: generating beyond it used to fail with an IndexError."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftdist.rundir import copy_tokenizer

    config = AutoConfig.from_pretrained(GPT2_TINY)
    config.n_positions = 32
    model = tmp_path / "short-context"
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    copy_tokenizer(GPT2_TINY, model)
    proc = run_cli("generate", str(model), "--prompt", "hi", "--max-new-tokens", "100000", "--greedy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = ("warning: --max-new-tokens 100000 goes past the model's context of 32 tokens; "
               "each answer stops at the context")
    assert warning in proc.stderr.splitlines(), proc.stderr


def test_prompt_style_follows_the_layouts_the_data_pipeline_detected(tmp_path: Path):
    """Recorded from the cache entry's report (no second read of the data, which a requeued node may not
    have): chat when every training source's rows were chat, also under a row selection (dpo_chosen)."""
    from sftdist import prompt_style
    from sftdist.data.pipeline import DataReport, SourceReport
    from sftdist.recipe import Recipe

    recipe = Recipe(output_dir=str(tmp_path))
    recipe.data.template = "alpaca"

    def recorded(*sources: SourceReport) -> dict:
        prompt_style.record(recipe, DataReport(list(sources), 1, 0, 1, 1, True, 64, 1))
        return json.loads((tmp_path / PROMPT_FILE).read_text())

    chat = SourceReport("hub:org/prefs", "train", "dpo_chosen", "messages")
    held_out = SourceReport("eval.jsonl", "eval", "alpaca", "alpaca")
    assert recorded(chat, held_out) == {"chat": True, "template": "alpaca"}
    assert recorded(chat, SourceReport("a.jsonl", "train", "alpaca", "alpaca")) == {"chat": False, "template": "alpaca"}
    assert prompt_style.read(tmp_path).chat is False


def _sharded_copy(tiny_model: Path, dest: Path) -> Path:
    """The tiny model saved in several shards with their index, its tokenizer beside (a full-model checkpoint's layout)."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(dest, max_shard_size="300KB")
    for f in tiny_model.iterdir():
        if f.is_file() and not f.name.startswith("model") and not (dest / f.name).exists():
            shutil.copy2(f, dest / f.name)
    return dest


def test_export_reads_the_index_and_refuses_weights_it_does_not_name(tmp_path: Path, tiny_model: Path):
    """A stray model.safetensors (here: another model's) beside a sharded checkpoint and its index used to be
    exported in place of the trained weights; the index decides, and a file it does not name is refused."""
    ckpt = _sharded_copy(tiny_model, tmp_path / "ckpt")
    assert len(list(ckpt.glob("model-*.safetensors"))) > 1
    out = tmp_path / "out"
    proc = run_cli("export", str(ckpt), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    exported = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    trained = {k: v for f in ckpt.glob("model-*.safetensors") for k, v in load_file(f).items()}
    assert exported.keys() == trained.keys() and all(bool((exported[k] == trained[k]).all()) for k in trained)

    shutil.copy2(GPT2_TINY / "model.safetensors", ckpt / "model.safetensors")
    proc = run_cli("export", str(ckpt), "--out", str(tmp_path / "out2"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == [
        f"error: {ckpt}: holds model.safetensors, which is not one of its weight files (named by "
        "model.safetensors.index.json); move it away, or export another checkpoint"], proc.stderr
    assert not (tmp_path / "out2").exists()


def test_export_refuses_non_finite_weights(tmp_path: Path, tiny_model: Path):
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model, ckpt)
    weights = load_file(ckpt / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    proc = run_cli("export", str(ckpt), "--out", str(tmp_path / "out"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == [
        f"error: {ckpt}: weight model.layers.1.mlp.up_proj.weight holds NaN or infinite values (the run diverged "
        "before this checkpoint was saved); export an earlier checkpoint"], proc.stderr
    assert not (tmp_path / "out").exists() and torch.isinf(weights["model.layers.1.mlp.up_proj.weight"]).any()
