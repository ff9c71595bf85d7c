"""The embedded tiny model (`sftdist make-tiny-model`) and the demo data set it is meant to learn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from sftdist.data.templates import PROMPT_TEMPLATES
from sftdist.demo import HELDOUT_PATH, TASKS, TRAIN_PATH, exact_match, generate_rows, write_demo

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "apple"},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "fig"},
]
GOLDEN = (
    "<s><|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nName a fruit.<|im_end|>\n"
    "<|im_start|>assistant\napple</s>\n"
    "<|im_start|>user\nAnother?<|im_end|>\n"
    "<|im_start|>assistant\nfig</s>\n"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_model_loads_as_llama_with_safetensors_and_long_context(tiny_model: Path, tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (tiny_model / "model.safetensors").is_file()
    assert not list(tiny_model.glob("*.bin"))
    assert model.config.max_position_embeddings >= 1024
    assert model.config.vocab_size == len(tokenizer)
    assert 2000 > len(tokenizer) > 500
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 3e6
    ids = tokenizer(["a cat", "the dog sees the moon"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (2, ids["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_special_tokens_are_distinct_and_agree_with_the_configs(tiny_model: Path, tokenizer) -> None:
    config = json.loads((tiny_model / "config.json").read_text())
    generation = json.loads((tiny_model / "generation_config.json").read_text())
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    for cfg in (config, generation):
        assert cfg["bos_token_id"] == tokenizer.bos_token_id
        assert cfg["eos_token_id"] == tokenizer.eos_token_id
        assert cfg["pad_token_id"] == tokenizer.pad_token_id


def test_bos_is_added_exactly_once_and_text_round_trips(tokenizer) -> None:
    bos = tokenizer.bos_token_id
    ids = tokenizer("What is the first word?").input_ids
    assert ids[0] == bos and ids.count(bos) == 1
    assert bos not in tokenizer("What is the first word?", add_special_tokens=False).input_ids
    # Like Llama, the post-processor adds no EOS: the training data must carry it.
    assert ids[-1] != tokenizer.eos_token_id
    chat_ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert chat_ids[0] == bos and chat_ids.count(bos) == 1
    text = "Über  café\n\t naïve 12345 ☃ <b>x</b>"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_chat_template_renders_the_golden_conversation(tokenizer) -> None:
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == GOLDEN
    assert tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False) == (
        "<s><|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\napple</s>\n"
    )
    prompt = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert prompt == GOLDEN[: GOLDEN.index("fig")]
    assert tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False).endswith("Another?<|im_end|>\n")


def test_assistant_mask_covers_exactly_each_reply_and_its_eos(tokenizer) -> None:
    out = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    spans, current = [], []
    for token, marked in zip(ids, mask):
        if marked:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    assert current == []  # the newline after the last EOS is not marked
    assert [tokenizer.decode(s) for s in spans] == ["apple</s>", "fig</s>"]
    assert all(s[-1] == tokenizer.eos_token_id for s in spans)


def test_demo_files_are_the_generator_output_byte_for_byte(tmp_path: Path) -> None:
    write_demo(tmp_path / "train.jsonl", tmp_path / "heldout.jsonl")
    assert (tmp_path / "train.jsonl").read_bytes() == TRAIN_PATH.read_bytes()
    assert (tmp_path / "heldout.jsonl").read_bytes() == HELDOUT_PATH.read_bytes()
    assert generate_rows() == generate_rows()
    assert generate_rows(seed=7) != generate_rows()


def test_demo_rows_have_the_dolly_schema_and_heldout_prompts_are_new() -> None:
    train, heldout = _read_jsonl(TRAIN_PATH), _read_jsonl(HELDOUT_PATH)
    assert len(train) == sum(rows for _, rows in TASKS.values()) <= 5000
    assert 100 <= len(heldout) <= 200
    for row in train + heldout:
        assert set(row) == {"instruction", "context", "response"}
        assert row["instruction"] and row["response"]
    assert any(r["context"] == "" for r in heldout) and any(r["context"] for r in heldout)
    template = PROMPT_TEMPLATES["default"]
    train_prompts = {template.render(r["instruction"], r["context"]) for r in train}
    heldout_prompts = [template.render(r["instruction"], r["context"]) for r in heldout]
    assert len(set(heldout_prompts)) == len(heldout_prompts)
    assert not train_prompts.intersection(heldout_prompts)
    # Numbers asked about in held-out rows never appear in a train question of the same task.
    train_after = {r["instruction"] for r in train if r["instruction"].startswith("What number comes after")}
    assert not train_after.intersection(r["instruction"] for r in heldout)


def test_demo_rows_tokenize_cleanly_for_completion_only_loss(tokenizer) -> None:
    """The prompt's tokens must be a prefix of prompt+response's, or trl cuts into the prompt."""
    template = PROMPT_TEMPLATES["default"]
    rows = _read_jsonl(TRAIN_PATH) + _read_jsonl(HELDOUT_PATH)
    prompts = [template.render(r["instruction"], r["context"]) for r in rows]
    prompt_ids = tokenizer(prompts).input_ids
    full_ids = tokenizer([p + r["response"] + tokenizer.eos_token for p, r in zip(prompts, rows)]).input_ids
    for p, f in zip(prompt_ids, full_ids):
        assert f[: len(p)] == p
        assert f[-1] == tokenizer.eos_token_id and f.count(tokenizer.eos_token_id) == 1
    # The demo recipe packs at a small max_length; no sample may be truncated there.
    assert max(len(f) for f in full_ids) < 64


def test_exact_match_normalises_whitespace_only() -> None:
    assert exact_match("cat\ndog", "cat dog")
    assert exact_match("  42\n", "42")
    assert exact_match("a  b\t c", "a b c")
    assert not exact_match("Cat", "cat")
    assert not exact_match("42.", "42")
    assert not exact_match("cat dog", "dog cat")
    assert not exact_match("", "cat")
    assert exact_match("", "  ")


def test_rebuilding_is_deterministic_and_replaces_an_earlier_tiny_model(tiny_model: Path, tmp_path: Path) -> None:
    from sftdist.tiny import make_tiny_model

    out = tmp_path / "again"
    shutil.copytree(tiny_model, out)
    (out / "model.safetensors").write_bytes(b"stale")
    make_tiny_model(str(out), seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (tiny_model / name).read_bytes(), name
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary folder left behind


def test_cli_refuses_to_replace_a_directory_it_did_not_write(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    result = run_cli("make-tiny-model", str(target))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "notes.txt" in result.stderr and "Traceback" not in result.stderr
    assert (target / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
