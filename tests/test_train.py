"""`sftdist train` end to end on CPU: full, LoRA and QLoRA learn (loss goes down) and save a result
that loads; the dolly fixture trains on the real GPT-2 layout; chat data trains through a fallback
chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import DOLLY, GPT2_TINY, REPO, run_cli

DEMO_TRAIN = REPO / "sftdist" / "demo" / "train.jsonl"


def write_recipe(tmp_path: Path, model: Path, sources: list[dict], **extra) -> Path:
    recipe = {
        "model": {"name_or_path": str(model)},
        "method": extra.pop("method", "full"),
        "data": {"train": sources, "max_length": 128, **extra.pop("data", {})},
        "train": {
            "max_steps": 8,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-3,
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
            "report_to": [],
            **extra.pop("train", {}),
        },
        "output_dir": str(tmp_path / "run"),
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def losses(run_dir: Path) -> list[float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def train_ok(recipe: Path, *args: str) -> Path:
    proc = run_cli("train", str(recipe), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return yaml.safe_load(recipe.read_text())["output_dir"]


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_method_learns_and_saves_loadable_model(tmp_path, tiny_model, method):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"method": method}
    if method != "full":
        extra["lora"] = {"r": 8, "alpha": 16}
        extra["train"] = {"learning_rate": 5e-3}
    recipe = write_recipe(tmp_path, tiny_model, [{"path": str(DEMO_TRAIN), "limit": 200}], **extra)
    run = Path(train_ok(recipe))
    ls = losses(run)
    assert len(ls) == 8
    assert sum(ls[-2:]) / 2 < sum(ls[:2]) / 2 - 0.1, ls
    info = json.loads((run / "sftdist_run.json").read_text())
    got = info["distributed"]
    assert (got["distributed_type"], got["num_processes"], got["global_batch"]) == ("NO", 1, 4)
    final = run / "final"
    assert (final / "sftdist_recipe.yaml").is_file()
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.pad_token_id != tok.eos_token_id
    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(final)
        assert model.generation_config.eos_token_id == tok.eos_token_id
    else:
        from peft import AutoPeftModelForCausalLM

        assert (final / "adapter_model.safetensors").is_file()
        model = AutoPeftModelForCausalLM.from_pretrained(final, dtype=torch.float32)
        if method == "lora":  # export --merge gives a plain model that answers like base + adapter
            merged_dir = tmp_path / "merged"
            proc = run_cli("export", str(final), "--out", str(merged_dir), "--merge")
            assert proc.returncode == 0, proc.stderr[-2000:]
            merged = AutoModelForCausalLM.from_pretrained(merged_dir)
            prompt = torch.tensor([tok("### Instruction:\nRepeat the words.")["input_ids"]])
            kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}
            assert torch.equal(merged.generate(prompt, **kw), model.generate(input_ids=prompt, **kw))
    # What was saved is the trained model: its logits differ from the base's, and it generates.
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([tok("### Instruction:\nRepeat the words.\n\n### Response:\n")["input_ids"]])
    with torch.no_grad():
        moved = (model(input_ids=ids).logits[..., : base.config.vocab_size] - base(ids).logits).abs().max().item()
    assert moved > 1e-2, moved
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 1 and ids.shape[1] < out.shape[1] <= ids.shape[1] + 3


def test_dolly_fixture_on_gpt2_layout(tmp_path):
    recipe = write_recipe(
        tmp_path, GPT2_TINY, [{"path": str(DOLLY), "limit": 64}], data={"max_length": 256}, train={"max_steps": 3}
    )
    run = Path(train_ok(recipe))
    assert len(losses(run)) == 3
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "final")
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    # GPT-2 has no pad token: a distinct one was added and the embeddings grew to hold it
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)


def test_chat_data_with_fallback_template_lora_on_gpt2(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in ["red", "green", "blue", "black"] * 4
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    recipe = write_recipe(
        tmp_path,
        GPT2_TINY,
        [{"path": str(data)}],
        method="lora",
        data={"chat_template": "chatml"},
        train={"max_steps": 2},
    )
    run = Path(train_ok(recipe))
    from transformers import AutoTokenizer

    from sftdist.data.pipeline import prepare
    from sftdist.model import load_tokenizer
    from sftdist.recipe import load_recipe

    tok = AutoTokenizer.from_pretrained(run / "final")
    assert "<|im_start|>" in tok.chat_template  # saved, so generation renders prompts the same way
    # The rows it trained on (the cache entry): loss on exactly each assistant answer and its EOS (and the
    # newline that ends the turn: prefix rendering takes the turn whole, up to the next one).
    loaded = load_recipe(recipe)
    rows = prepare(loaded, lambda: load_tokenizer(loaded), progress=False).train
    eos = tok.eos_token
    for row in rows:
        text = tok.decode(row["input_ids"])
        answers = [turn.split(eos)[0] + eos + "\n" for turn in text.split("<|im_start|>assistant\n")[1:]]
        trained = tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
        assert answers and trained == "".join(answers), (trained, text)
        assert all(a[: -len(eos) - 1] in ("red", "green", "blue", "black") for a in answers), answers
