"""Packing never lets one sample attend to another: the loss of a packed, padding-free batch equals
the token-weighted loss of its samples run one by one (to 1e-5), on every attention we allow on CPU."""

from __future__ import annotations

import pytest
import torch

from sftdist.errors import UserError


def _samples(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(5, vocab - 1, (n,), generator=g).tolist() for n in (17, 9, 30, 5)]


def _packed_vs_single(model_dir, attn: str) -> tuple[float, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)
    model.config.use_cache = False
    model.eval()
    samples = _samples(model.config.vocab_size)
    packed = pack_dataset(Dataset.from_dict({"input_ids": samples}), 128, "bfd")
    assert len(packed) == 1  # all four samples share one row
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([packed[0]])
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_loss = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False
        ).loss.item()
        total, count = 0.0, 0
        for s in samples:
            ids = torch.tensor([s])
            n = len(s) - 1  # tokens that are predicted
            total += model(input_ids=ids, labels=ids, use_cache=False).loss.item() * n
            count += n
    return packed_loss, total / count


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_per_sample_loss_llama(tiny_model, attn):
    packed, single = _packed_vs_single(tiny_model, attn)
    assert packed == pytest.approx(single, abs=1e-5)


@pytest.fixture(scope="module")
def gpt2_model(tmp_path_factory):
    """The GPT-2 layout with a hidden size large enough that context changes the loss (the shared
    fixture's hidden size of 2 makes every prediction nearly uniform)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256)).save_pretrained(out)
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_per_sample_loss_gpt2(gpt2_model, attn):
    packed, single = _packed_vs_single(gpt2_model, attn)
    assert packed == pytest.approx(single, abs=1e-5)


def test_contamination_would_be_detected(tiny_model):
    """The same packed row without per-sample positions (one long causal sequence) differs by far more
    than the tolerance, so the equality above is evidence of isolation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    samples = _samples(model.config.vocab_size)
    ids = torch.tensor([sum(samples, [])])
    labels = ids.clone()
    starts = torch.tensor([0] + [len(s) for s in samples]).cumsum(0)[:-1]
    labels[0, starts] = -100
    with torch.no_grad():
        contaminated = model(input_ids=ids, labels=labels, use_cache=False).loss.item()
    _, single = _packed_vs_single(tiny_model, "sdpa")
    assert abs(contaminated - single) > 1e-3


def test_packing_refused_for_attention_that_cannot_isolate_samples(tiny_model):
    from sftdist.model import resolve_attention
    from sftdist.recipe import recipe_from_dict

    recipe = recipe_from_dict(
        {
            "model": {"name_or_path": str(tiny_model), "attn_implementation": "flex_attention"},
            "data": {"train": [{"path": "x.jsonl"}]},
        }
    )
    with pytest.raises(UserError, match="cannot keep packed samples"):
        resolve_attention(recipe)
    recipe.data.packing = False
    assert resolve_attention(recipe) == "flex_attention"
