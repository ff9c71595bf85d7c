"""The training guarantees, checked on the trainer `sftdist train` builds (`train.build_trainer`, the CPU
head included) rather than on a trainer configured by hand:

- packing: batches are padding-free rows of whole samples whose position_ids restart at 0, and a change to
  one sample does not change the loss of another (fails if train.py's packing_strategy or padding_free
  changes);
- completion-only loss: prompt tokens have label -100, response tokens and EOS keep theirs (fails if
  completion_only_loss is turned off);
- loss normalisation: samples of unequal length give the same update with per-device batch 4 x
  accumulation 1 and batch 1 x accumulation 4, with the CPU head and with trl's; the CPU head's
  `num_items_in_batch` path gives trl's loss. (Across processes: tests/test_distributed.py compares the
  2-process ddp run with the one-process run of the same global batch, on the launches of tests/launched.py.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sftdist import fast_head

WORDS = "the cat sat on a mat and then it ran to see the dog".split()
# (prompt words, response words): 8 samples of 21-104 tokens, 5-54 of them carrying loss, which trl's
# best-fit-decreasing packs into 4 rows of max_length 128.
SHAPES = [(30, 40), (4, 3), (12, 30), (3, 8), (25, 6), (8, 14), (40, 20), (6, 2)]
MAX_LENGTH = 128
PACKS = 4


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rows") / "train.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, (p, r) in enumerate(SHAPES):
            prompt = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(p))
            response = " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(r))
            f.write(json.dumps({"instruction": prompt, "context": "", "response": response}) + "\n")
    return path


def build(model: Path, rows: Path, out: Path, **train: Any) -> tuple[Any, Any, Any]:
    """(trainer, tokenizer, prepared data) exactly as `run_training` builds them, for this recipe."""
    from sftdist.data.pipeline import prepare
    from sftdist.model import load_model, load_tokenizer
    from sftdist.recipe import recipe_from_dict
    from sftdist.train import build_sft_config, build_trainer

    recipe = recipe_from_dict(
        {
            "model": {"name_or_path": str(model)},
            "data": {"train": [{"path": str(rows), "format": "dolly"}], "max_length": MAX_LENGTH},
            "train": {"max_steps": 1, "report_to": [], "save_strategy": "no", "seed": 0, **train},
            "output_dir": str(out),
        },
        source="recipe",
    )
    args = build_sft_config(recipe)
    tokenizer = load_tokenizer(recipe)
    data = prepare(recipe, lambda: tokenizer, progress=False)
    return build_trainer(recipe, args, tokenizer, data, load_model(recipe, tokenizer)), tokenizer, data


def samples_of(data: Any) -> list[tuple[list[int], list[int]]]:
    """(input_ids, loss mask) of every sample in the prepared (packed) rows, cut at their seq_lengths."""
    out = []
    for row in data.train:
        start = 0
        for n in row["seq_lengths"]:
            ids, labels = row["input_ids"][start : start + n], row["labels"][start : start + n]
            out.append((ids, [int(t != -100) for t in labels]))
            start += n
    return out


def segments(batch: dict) -> list[tuple[int, int]]:
    """(start, end) of each sample in a padding-free row: where position_ids restart at 0."""
    pos = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return list(zip(starts, starts[1:]))


@pytest.fixture(scope="module")
def packed(tiny_model: Path, rows: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict, Any, Any]:
    """The trainer with per-device batch 4 (the whole data set: 4 packs) and its first batch."""
    trainer, tokenizer, data = build(tiny_model, rows, tmp_path_factory.mktemp("run") / "out",
                                     per_device_train_batch_size=PACKS)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch, tokenizer, data


def test_batches_are_padding_free_packs_of_whole_samples(packed):
    trainer, batch, tokenizer, data = packed
    assert trainer.args.packing and trainer.args.padding_free and trainer.args.packing_strategy == "bfd"
    samples = [ids for ids, _ in samples_of(data)]
    assert len(samples) == len(SHAPES) and len(trainer.train_dataset) == PACKS  # samples shared rows
    # One flat row, no padding and no attention mask: attention is kept within samples by position_ids.
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    ids, pos = batch["input_ids"][0].tolist(), batch["position_ids"][0].tolist()
    assert tokenizer.pad_token_id not in ids
    # Every sample appears whole, once, with positions 0..n-1: none is split, cut or merged.
    spans = segments(batch)
    assert sorted(ids[a:b] for a, b in spans) == sorted(samples)
    assert all(pos[a:b] == list(range(b - a)) for a, b in spans)


def test_a_sample_does_not_change_another_samples_loss(packed):
    trainer, batch, _, data = packed
    spans = segments(batch)
    first_a, first_b = spans[0]
    masks = {tuple(s): m for s, m in samples_of(data)}
    prompt = masks[tuple(batch["input_ids"][0, first_a:first_b].tolist())].index(1)
    changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    prompt_ids = changed["input_ids"][0, first_a:first_a + prompt]
    prompt_ids.copy_(torch.roll(prompt_ids, 1) + 1)  # other prompt tokens, same length

    def per_token(inputs: dict) -> torch.Tensor:
        """Per-token log-probs from the forward `compute_loss` calls (log_probs[i] scores token i + 1)."""
        trainer.model.eval()
        with torch.no_grad():
            out = trainer.model(**trainer._prepare_inputs(dict(inputs)), use_cache=False, fused_lm_head=True)
        return out.log_probs[0]

    before, after = per_token(batch), per_token(changed)
    # The changed prompt changes its own sample's loss, and no other sample's.
    assert not torch.allclose(before[first_a:first_b - 1], after[first_a:first_b - 1], atol=1e-4)
    torch.testing.assert_close(before[first_b:], after[first_b:], rtol=0, atol=1e-6)


def test_only_response_tokens_and_eos_carry_loss(packed):
    _, batch, tokenizer, data = packed
    masks = {tuple(s): m for s, m in samples_of(data)}
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    for a, b in segments(batch):
        mask = masks[tuple(ids[a:b])]
        prompt = mask.index(1)
        assert prompt > 0 and all(mask[prompt:])  # a prompt, then the response to the end
        assert labels[a:a + prompt] == [-100] * prompt
        assert labels[a + prompt:b] == ids[a + prompt:b]
        assert ids[b - 1] == labels[b - 1] == tokenizer.eos_token_id


def _update(model: Path, rows: Path, out: Path, trl_head: bool, batch: int, accumulation: int,
            monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Parameter change of one optimizer step (plain SGD at lr 1, no clipping: the update is the gradient)."""
    with monkeypatch.context() as m:
        if trl_head:
            m.setattr(fast_head, "install", lambda trainer: False)
        trainer, _, _ = build(model, rows, out, per_device_train_batch_size=batch,
                              gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0,
                              max_grad_norm=0, lr_scheduler_type="constant")
    assert trainer.args.max_steps == 1 and len(trainer.train_dataset) == PACKS == batch * accumulation
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}


def test_same_update_for_batch_4_and_batch_1_times_accumulation_4(tiny_model, rows, tmp_path, monkeypatch, packed):
    trainer, batch, _, _ = packed
    # Unequal tokens carrying loss per pack: a per-micro-batch mean would weight them differently.
    loss_tokens = [sum(x != -100 for x in p["labels"]) for p in trainer.train_dataset]
    assert len(set(loss_tokens)) > 1, loss_tokens
    updates = {
        (head, b, a): _update(tiny_model, rows, tmp_path / f"{head}-{b}x{a}", head == "trl", b, a, monkeypatch)
        for head in ("cpu", "trl") for b, a in ((4, 1), (1, 4))
    }
    reference = updates[("cpu", 4, 1)]
    assert max(float(u.abs().max()) for u in reference.values()) > 1e-3  # the step moved the weights
    for key, update in updates.items():
        for name, u in update.items():
            torch.testing.assert_close(u, reference[name], rtol=0, atol=1e-5, msg=f"{key} {name}")


def test_cpu_head_loss_with_num_items_in_batch_is_trls(tiny_model, rows, tmp_path, monkeypatch, packed):
    trainer, batch, _, _ = packed
    with monkeypatch.context() as m:
        m.setattr(fast_head, "install", lambda trainer: False)
        trl_trainer, _, _ = build(tiny_model, rows, tmp_path / "trl", per_device_train_batch_size=PACKS)
    inputs = {k: v for k, v in trainer._prepare_inputs(dict(batch)).items()}
    counted = int((batch["labels"][:, 1:] != -100).sum())
    items = torch.tensor(3 * counted)  # as if this were one of three accumulated micro-batches
    losses = []
    for t in (trainer, trl_trainer):
        t.model.eval()
        with torch.no_grad():
            out = t.model(**inputs, use_cache=False, fused_lm_head=True, num_items_in_batch=items)
        torch.testing.assert_close(out.loss, -out.log_probs.sum() / items, rtol=1e-6, atol=0)
        losses.append(out.loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
