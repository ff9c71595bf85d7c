"""Each format is detected and rendered (golden strings), and exactly the response/assistant tokens
plus EOS carry loss."""

from __future__ import annotations

import pytest

from sftdist.data.encode import Encoder, stop_token_ids
from sftdist.data.formats import detect_format, render_row
from sftdist.errors import UserError

DOLLY = {"instruction": "Name a colour.", "context": "The sky is blue.", "response": "Blue", "category": "qa"}
ALPACA = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}


@pytest.mark.parametrize(
    "row, fmt",
    [
        (DOLLY, "dolly"),
        (ALPACA, "alpaca"),
        (CHAT, "messages"),
        (SHAREGPT, "sharegpt"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"text": "hello"}, "text"),
    ],
)
def test_detect(row, fmt):
    assert detect_format(list(row), "f.jsonl") == fmt


def test_detect_unknown_lists_columns_and_formats():
    with pytest.raises(UserError) as e:
        detect_format(["question", "answer"], "f.jsonl")
    assert "['answer', 'question']" in str(e.value) and "dolly (instruction, response)" in str(e.value)


def test_render_dolly_default_template_with_and_without_context():
    ex = render_row(DOLLY, "dolly", "default", "w")
    assert ex.prompt == "### Instruction:\nName a colour.\n\n### Context:\nThe sky is blue.\n\n### Response:\n"
    assert ex.completion == "Blue"
    ex = render_row({**DOLLY, "context": ""}, "dolly", "default", "w")
    assert ex.prompt == "### Instruction:\nName a colour.\n\n### Response:\n"


def test_render_alpaca_template():
    ex = render_row(ALPACA, "alpaca", "alpaca", "w")
    assert ex.prompt.startswith("Below is an instruction that describes a task. Write a response")
    assert ex.prompt.endswith("### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
    assert ex.completion == "5"


def test_render_sharegpt_maps_roles():
    ex = render_row(SHAREGPT, "sharegpt", "default", "w")
    assert ex.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_empty_response_is_dropped():
    assert render_row({**DOLLY, "response": "  "}, "dolly", "default", "w") is None


@pytest.fixture(scope="module")
def encoder(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return Encoder(tok, 512, "completion", False, stop_token_ids(tok))


def _loss_text(enc, ids, mask):
    return enc.tok.decode([t for t, m in zip(ids, mask) if m])


def test_instruction_mask_is_response_plus_eos_and_one_bos(encoder):
    ex = render_row(DOLLY, "dolly", "default", "w")
    ids, mask = encoder.encode_one(ex, "w")
    tok = encoder.tok
    assert tok.pad_token_id != tok.eos_token_id
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.eos_token_id and mask[-1] == 1
    assert _loss_text(encoder, ids, mask) == "Blue</s>"
    assert tok.decode(ids[: mask.index(1)], skip_special_tokens=True) == ex.prompt


def test_text_format_trains_on_everything_with_eos(encoder):
    ids, mask = encoder.encode_one(render_row({"text": "red green"}, "text", "default", "w"), "w")
    assert all(mask) and ids[-1] == encoder.tok.eos_token_id


def test_chat_mask_covers_exactly_assistant_turns(encoder):
    ex = render_row(CHAT, "messages", "default", "w")
    ids, mask = encoder.encode_one(ex, "w")
    tok = encoder.tok
    assert ids.count(tok.bos_token_id) == 1  # the template writes BOS; the tokenizer must not add another
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    assert spans == ["Hello</s>", "Goodbye</s>"]  # from the template's {% generation %} markers


def test_loss_on_all(encoder):
    enc = Encoder(encoder.tok, 512, "all", False, encoder.stop_ids)
    _, mask = enc.encode_one(render_row(DOLLY, "dolly", "default", "w"), "w")
    assert all(mask)


def test_chat_template_without_eos_is_refused(encoder):
    tok = encoder.tok
    saved = tok.chat_template
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    try:
        with pytest.raises(UserError, match="never learn to stop"):
            encoder.encode_one(render_row(SHAREGPT, "sharegpt", "default", "w"), "w")
    finally:
        tok.chat_template = saved


def test_over_long_samples_dropped_or_truncated_each_counted_once(encoder):
    ex = render_row(DOLLY, "dolly", "default", "w")
    ids, mask = encoder.encode_one(ex, "w")
    n, prompt = len(ids), mask.index(1)
    short = Encoder(encoder.tok, n - 1, "completion", False, encoder.stop_ids).encode([ex, ex], "w")
    assert short.dropped == {f"longer than max_length {n - 1}": 2} and short.input_ids == [] and short.truncated == 0
    cut = Encoder(encoder.tok, n - 1, "completion", True, encoder.stop_ids).encode([ex], "w")
    assert cut.truncated == 1 and not cut.dropped and len(cut.input_ids[0]) == n - 1
    # A cut that leaves no token to learn drops the row: counted once, not also as truncated.
    none_left = Encoder(encoder.tok, prompt, "completion", True, encoder.stop_ids).encode([ex], "w")
    assert none_left.truncated == 0 and none_left.dropped == {f"no loss-carrying token within max_length {prompt}": 1}
