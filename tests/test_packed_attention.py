"""Padding-free packed rows on a GPU without flash-attn (packed_attention.py, packed_rows.py), checked on CPU:
the cu_seqlens torch's varlen kernel gets, the wiring of the attention function around it (with a per-sample
reference standing in for the CUDA kernel, which the selftest's packing check covers on a GPU), and the regrouping
of a flat row into rows of whole samples that sdpa/eager get instead."""

from __future__ import annotations

import pytest
import torch

from sftdist import packed_attention, packed_rows


def test_cu_seqlens_start_at_position_breaks_and_at_every_row():
    # Row 1 ends inside a sample (positions 0, 1 ...); row 2 goes on with 2, 3: a new sample all the same.
    pos = torch.tensor([[0, 1, 2, 0, 1], [2, 3, 0, 1, 2]])
    cu, longest = packed_attention.cu_seqlens(pos)
    assert cu.tolist() == [0, 3, 5, 7, 10] and cu.dtype == torch.int32 and longest == 3
    # trl's flat row: padding (position 0 each) is one-token samples.
    cu, longest = packed_attention.cu_seqlens(torch.tensor([[0, 1, 2, 3, 0, 1, 0, 0]]))
    assert cu.tolist() == [0, 4, 6, 7, 8] and longest == 4


calls: list[dict] = []


def reference_new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                  enable_gqa=False):
    """varlen_attn's contract in torch 2.13 (window_size, enable_gqa, scale), one sample at a time with sdpa."""
    calls.append({"dtype": query.dtype, "cu": cu_seq_q.tolist(), "cu_dtype": cu_seq_q.dtype, "gqa": enable_gqa,
                  "heads": (query.shape[1], key.shape[1]), "window": window_size, "max": max_q})  # fmt: skip
    assert cu_seq_k is cu_seq_q and max_q == max_k and window_size[1] == 0  # causal
    out = []
    for a, b in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        i = torch.arange(b - a)
        mask = i[:, None] >= i[None, :]
        if window_size[0] >= 0:
            mask &= i[:, None] - i[None, :] <= window_size[0]
        q, k, v = (x[a:b].transpose(0, 1).float() for x in (query, key, value))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
        out.append(o.transpose(0, 1).to(query.dtype))
    return torch.cat(out)


def reference_old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
    """torch 2.10's contract: is_causal, no GQA (K/V must come repeated), no window, no scale."""
    assert is_causal and query.shape[1] == key.shape[1]
    return reference_new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, 0))


def gqa_llama(**extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=97, **extra)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("kernel", [reference_new, reference_old], ids=["torch-2.13", "torch-2.10"])
def test_packed_row_through_the_varlen_function_equals_each_sample_alone(kernel):
    model = gqa_llama()
    lengths = [5, 9, 3]
    ids = torch.randint(0, 97, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=ids[:, a:a + n]).logits for a, n in
                           zip([0, 5, 14], lengths)], dim=1)  # fmt: skip
        name = packed_attention.register(kernel, name=f"sftdist_varlen_test_{kernel.__name__}")
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == name
        calls.clear()
        packed = model(input_ids=ids, position_ids=pos).logits
    # fp32 activations reach the kernel as bf16 (its only dtypes besides fp16) and come back as fp32.
    assert packed.dtype == torch.float32 and calls and all(c["dtype"] == torch.bfloat16 for c in calls)
    assert all(c["cu"] == [0, 5, 14, 17] and c["cu_dtype"] == torch.int32 and c["max"] == 9 for c in calls)
    if kernel is reference_new:
        assert all(c["gqa"] and c["heads"] == (4, 2) and c["window"] == (-1, 0) for c in calls)
    else:
        assert all(c["heads"] == (4, 4) for c in calls)  # repeated for a kernel without GQA
    assert (packed - alone).abs().max().item() < 2e-2  # bf16 attention against fp32 sdpa


def test_sliding_window_becomes_the_kernels_left_window():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=97, sliding_window=4)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    lengths = [7, 3]
    ids = torch.randint(0, 97, (1, 10))
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=ids[:, :7]).logits, model(input_ids=ids[:, 7:]).logits], dim=1)
        model.set_attn_implementation(packed_attention.register(reference_new, name="sftdist_varlen_test_window"))
        calls.clear()
        packed = model(input_ids=ids, position_ids=pos).logits
    assert calls and all(c["window"] == (3, 0) for c in calls)  # transformers' window of 4 includes the token itself
    assert (packed - alone).abs().max().item() < 2e-2


def test_auto_on_cpu_stays_sdpa_and_the_kernel_is_only_offered_on_cuda(tmp_path, tiny_model):
    import yaml

    from sftdist.model import resolve_attention
    from sftdist.recipe import load_recipe

    assert packed_attention.kernel() is None  # no GPU here
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model)}, "data": {"train": [{"path": "d.jsonl"}]}}))
    assert resolve_attention(load_recipe(str(path))) == "sdpa"


def test_flat_row_runs_as_rows_of_whole_samples_no_longer_than_max_length():
    """The sdpa/eager path on a GPU: a flat row of 4 samples (9 + 7 + 8 + 3 tokens) with max_length 16 runs as rows
    of at most 16 tokens of whole samples, and the hidden states come back in the flat order, as each sample alone."""
    model = gqa_llama()
    decoder = model.model
    seen = []
    inner = decoder.forward

    def spy(*args, **kwargs):
        seen.append(tuple(kwargs["input_ids"].shape))
        return inner(*args, **kwargs)

    lengths = [9, 7, 8, 3]
    starts = [0, 9, 16, 24]
    ids = torch.randint(0, 97, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        alone = torch.cat([inner(input_ids=ids[:, a:a + n]).last_hidden_state for a, n in zip(starts, lengths)], 1)
        forward = packed_rows.regrouped_forward(spy, 16)
        out = forward(decoder, input_ids=ids, position_ids=pos, attention_mask=None)
    assert seen == [(2, 16)]  # [9 + 7], [8 + 3]: whole samples, each row at most max_length
    assert out.last_hidden_state.shape == (1, 27, 64)
    assert torch.allclose(out.last_hidden_state, alone, atol=1e-5)
    seen.clear()
    with torch.no_grad():  # a batch that is not a flat packed row is left alone
        forward(decoder, input_ids=ids[:, :9].expand(2, -1), position_ids=pos[:, :9].expand(2, -1))
    assert seen == [(2, 9)]
