"""Real chat data: tool calls in both layouts, typed content, reasoning under trl's training templates,
per-turn loss, alpaca system/history, DPO/KTO rows, ignored columns; golden renderings with the
loss-carrying tokens in [[brackets]] (the `sftdist data --show` marking). End to end: every layout
trains with `sftdist train` (full and LoRA), `--show` prints the masks, and `generate` renders a
chat-trained run's prompts with its chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from sftdist.data.encode import Encoder, stop_token_ids
from sftdist.data.formats import render_row, render_rows
from sftdist.data.show import mark_loss
from sftdist.errors import UserError

TOOL = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
OPENAI_TOOLS = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "assistant", "content": "It is 18C."},
    ],
    "tools": [{"type": "function", "function": TOOL}],
}
SHAREGPT_TOOLS = {  # LLaMA-Factory's layout: JSON strings for the call and the tools
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "18C"},
        {"from": "gpt", "value": "It is 18C."},
    ],
    "tools": json.dumps([TOOL]),
}
GOLDEN_TOOLS = (
    '<s><|im_start|>tools\n{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", '
    '"properties": {"city": {"type": "string"}}}}}\n<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n'
    '<|im_start|>assistant\n[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call></s>]]\n'
    "<|im_start|>tool\n18C<|im_end|>\n<|im_start|>assistant\n[[It is 18C.</s>]]\n"
)
REASONING = {
    "messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add them"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "thinking": "add again"},
    ]
}
ALPACA_HISTORY = {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Be terse.", "history": [["2+2?", "4"]]}
DPO = {
    "prompt": [{"role": "user", "content": "Hi"}],
    "chosen": [{"role": "assistant", "content": "Hello!"}],
    "rejected": [{"role": "assistant", "content": "Go away"}],
}
KTO = [{"prompt": "Hi", "completion": "Hello!", "label": True}, {"prompt": "Hi", "completion": "Go away", "label": False}]


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def family_tokenizer(tiny_model: Path, template: str, eos: str, specials: list[str], bos: str | None = None):
    """The tiny tokenizer with a model family's special tokens and chat template (as the real model ships)."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_model)
    t.add_special_tokens({"additional_special_tokens": specials})
    t.eos_token = eos
    if bos:
        t.bos_token = bos
    t.chat_template = template
    return t


@pytest.fixture(scope="module")
def qwen3(tiny_model):
    import trl.chat_template_utils as ctu

    specials = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]
    return family_tokenizer(tiny_model, ctu.qwen3_chat_template, "<|im_end|>", specials)


@pytest.fixture(scope="module")
def llama3(tiny_model):
    import trl.chat_template_utils as ctu

    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
    return family_tokenizer(tiny_model, ctu.llama3_chat_template, "<|eot_id|>", specials, bos="<|begin_of_text|>")


def marked(tokenizer, row: dict, fmt: str = "auto") -> str:
    """The row as training sees it, loss-carrying tokens in [[brackets]]."""
    enc = Encoder(tokenizer, 4096, "completion", False, stop_token_ids(tokenizer))
    ex = render_rows([row], ["line 1"], fmt, "default", "f.jsonl").examples[0]
    return mark_loss(tokenizer, *enc.encode_one(ex, "f.jsonl line 1"), colour=False)


# --- tool calls -----------------------------------------------------------------------------------
@pytest.mark.parametrize("row", [OPENAI_TOOLS, SHAREGPT_TOOLS], ids=["openai", "sharegpt"])
def test_tool_calls_render_with_tools_and_results_carry_no_loss(tok, row):
    assert marked(tok, row) == GOLDEN_TOOLS


def test_tool_calls_under_qwen3_training_template(qwen3):
    text = marked(qwen3, OPENAI_TOOLS)
    assert '[[<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n]]' in text
    assert "<tool_response>\n18C\n</tool_response><|im_end|>\n<|im_start|>assistant\n[[" in text
    assert text.count("[[") == 2 and "get_weather" in text.split("[[")[0]  # the tools list is in the prompt


def test_template_that_drops_tools_is_refused(tok):
    from sftdist.data.templates import CHATML_TEXT

    saved = tok.chat_template
    tok.chat_template = CHATML_TEXT
    try:
        with pytest.raises(UserError, match=r"f.jsonl line 1: the chat template of .* does not render tools "
                           r"\('get_weather' is missing\); set data.chat_template to one that does"):
            marked(tok, OPENAI_TOOLS)
    finally:
        tok.chat_template = saved


def test_bad_tool_call_arguments_name_the_turn():
    row = {"messages": [{"role": "user", "content": "x"},
                        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]}
    with pytest.raises(UserError, match=r"^w: messages\[1\]: the arguments of tool call 'f' is not valid JSON"):
        render_row(row, "messages", "default", "w")


# --- typed content, media ---------------------------------------------------------------------------
def test_typed_text_parts_are_joined(tok):
    row = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Name "}, {"type": "text", "text": "a fruit."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "fig"}]},
    ]}
    assert marked(tok, row) == "<s><|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n[[fig</s>]]\n"


@pytest.mark.parametrize("row, where", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "a.png"}, {"type": "text", "text": "?"}]},
                   {"role": "assistant", "content": "cat"}]}, "w: messages[0] content[0] is a media part (image)"),
    ({"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "cat"}], "images": ["a.png"]},
     "w: field 'images' holds media"),
])
def test_media_is_refused_as_text_only(row, where):
    with pytest.raises(UserError) as e:
        render_row(row, "messages", "default", "w")
    assert str(e.value).startswith(where) and "sftdist trains text-only models" in str(e.value)


# --- alpaca system and history ----------------------------------------------------------------------
def test_alpaca_system_and_history_are_earlier_turns_without_loss(tok):
    assert marked(tok, ALPACA_HISTORY) == (
        "<s>Be terse.\n\n### Instruction:\n2+2?\n\n### Response:\n4\n\n"
        "### Instruction:\nAnd 3+3?\n\n### Response:\n[[6</s>]]"
    )


# --- per-turn loss ------------------------------------------------------------------------------------
def test_per_turn_loss_weight_and_train_flags(tok):
    row = {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "loss_weight": 0},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye", "loss_weight": 1.0},
    ]}
    golden = ("<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello</s>\n"
              "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n[[Goodbye</s>]]\n")
    assert marked(tok, row) == golden
    flags = {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "train": False},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye", "train": True},
    ]}
    assert marked(tok, flags) == golden


@pytest.mark.parametrize("turn, message", [
    ({"role": "assistant", "content": "a", "loss_weight": 0.5}, "loss_weight is 0.5; only 0 or 1 is supported"),
    ({"role": "assistant", "content": "a", "weight": 2}, "weight is 2; only 0 or 1 is supported"),
    ({"role": "assistant", "content": "a", "weight": 0, "train": True}, r"has loss flags that disagree \(weight: 0, train: True\)"),
    ({"role": "user", "content": "a", "train": True}, "is a user turn marked to carry loss; only assistant turns can"),
    ({"role": "user", "content": [{"type": "reasoning", "value": "hm"}]},
     r"content\[0\] is a reasoning part in a user turn; only assistant turns hold reasoning"),
])
def test_per_turn_loss_refusals(turn, message):
    row = {"messages": [turn, {"role": "assistant", "content": "b"}]}
    with pytest.raises(UserError, match=rf"^w: messages\[0\] {message}"):
        render_row(row, "messages", "default", "w")


# --- reasoning under trl's training templates; a template that is not prefix-stable ------------------
def test_tiny_template_renders_reasoning_inside_the_loss(tok):
    assert marked(tok, REASONING) == (
        "<s><|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n[[<think>\nadd them\n</think>\n4</s>]]\n"
        "<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n[[<think>\nadd again\n</think>\n6</s>]]\n"
    )


def test_qwen3_reasoning_turns_use_trl_training_template(qwen3):
    from sftdist.data.chat import mask_template

    assert mask_template(qwen3)[1] == "trl's qwen3 training template"
    # Qwen3's own template drops the first turn's reasoning once a later turn exists (not prefix-stable);
    # the training template keeps both, and both carry loss.
    assert marked(qwen3, REASONING) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n[[<think>\nadd them\n</think>\n\n4<|im_end|>\n]]"
        "<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n[[<think>\nadd again\n</think>\n\n6<|im_end|>\n]]"
    )
    row = {"messages": [{**REASONING["messages"][1], "loss_weight": 0} if i == 1 else m for i, m in enumerate(REASONING["messages"])]}
    assert marked(qwen3, row).count("[[") == 1 and "[[<think>\nadd again" in marked(qwen3, row)


def test_llama3_turns_use_trl_training_template(llama3):
    plain = {"messages": [{k: v for k, v in m.items() if k in ("role", "content")} for m in REASONING["messages"]]}
    assert marked(llama3, plain) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n[[4<|eot_id|>]]"
        "<|start_header_id|>user<|end_header_id|>\n\n3+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n[[6<|eot_id|>]]"
    )


def test_template_that_drops_reasoning_is_refused(llama3):
    """Llama 3's template has no place for reasoning: training without it would be silent loss."""
    with pytest.raises(UserError, match=r"^f.jsonl line 1: trl's llama3 training template does not render reasoning "
                       r"\('add them' is missing\); set data.chat_template to one that does"):
        marked(llama3, REASONING)


# A template without generation markers whose generation prompt ends in `<think>\n\n` (axolotl's Qwen3
# layout): the prompt is not a prefix of a turn that renders `<think>\nreasoning`.
THINK_PROMPT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
    "{{ '<think>\\n' + (m.get('reasoning_content') or '') + '\\n</think>\\n\\n' + m['content'] + eos_token }}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n' }}{% endif %}"
)


def test_loss_starts_where_the_generation_prompt_and_the_turn_part(tok):
    """The prefix fallback starts the loss at the common prefix: the whole reasoning is trained."""
    saved = tok.chat_template
    tok.chat_template = THINK_PROMPT_TEMPLATE
    try:
        row = {"messages": [*REASONING["messages"][:3], {"role": "assistant", "content": "6"}]}
        assert marked(tok, row) == (
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n[[add them\n</think>\n\n4</s>\n]]"
            "<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n[[</think>\n\n6</s>\n]]"
        )
    finally:
        tok.chat_template = saved


def test_unknown_template_that_is_not_prefix_stable_is_refused(tok):
    saved = tok.chat_template
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    try:
        with pytest.raises(UserError, match="does not render conversations prefix by prefix"):
            marked(tok, {"messages": [{k: m[k] for k in ("role", "content")} for m in REASONING["messages"]]})
    finally:
        tok.chat_template = saved


def test_family_chat_template_setting(tiny_model, tmp_path):
    import trl.chat_template_utils as ctu

    from sftdist.data.chat import set_chat_template
    from sftdist.recipe import load_recipe

    t = family_tokenizer(tiny_model, None, "</s>", [])
    set_chat_template(t, "qwen3", "r.yaml")
    assert t.chat_template == ctu.qwen3_training_chat_template
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "data": {"train": [{"path": "d"}], "chat_template": "qwen9"}}))
    with pytest.raises(UserError, match=r"data.chat_template: 'qwen9' is not valid; expected one of: auto, chatml, .*qwen3, "):
        load_recipe(path)


# --- preference and labelled rows ---------------------------------------------------------------------
def test_preference_and_labelled_rows_are_refused_under_auto():
    with pytest.raises(UserError, match=r"^f.jsonl: columns 'chosen' and 'rejected': this is preference \(DPO\) data.*"
                       "set format: dpo_chosen"):
        render_rows([DPO], ["line 1"], "auto", "default", "f.jsonl")
    with pytest.raises(UserError, match=r"^f.jsonl: column 'label' is true/false: this is labelled \(KTO\) data.*"
                       "set format: kto_good"):
        render_rows(KTO, ["line 1", "line 2"], "auto", "default", "f.jsonl")


def test_dpo_chosen_and_kto_good_select_what_trains(tok):
    assert marked(tok, DPO, "dpo_chosen") == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello!</s>]]\n"
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}],
                "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "Go away"}}
    assert render_rows([sharegpt], ["line 1"], "dpo_chosen", "default", "f").examples[0].messages[-1]["content"] == "Hello!"
    alpaca = {"instruction": "Hi", "input": "", "chosen": "Hello!", "rejected": "Go away"}
    assert render_rows([alpaca], ["line 1"], "dpo_chosen", "default", "f").examples[0].completion == "Hello!"
    r = render_rows(KTO, ["line 1", "line 2"], "kto_good", "default", "f.jsonl")
    assert r.format == "prompt_completion" and [e.completion for e in r.examples] == ["Hello!"]
    assert r.dropped == {"labelled bad": 1}


# --- end to end through the CLI -----------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def chat_sources(tmp_path_factory) -> list[dict]:
    d = tmp_path_factory.mktemp("chat-data")
    per_turn = {"messages": [{**m, "loss_weight": 0} if i == 1 else m for i, m in enumerate(REASONING["messages"])]}
    return [
        {"path": write_jsonl(d / "openai-tools.jsonl", [OPENAI_TOOLS] * 2)},
        {"path": write_jsonl(d / "sharegpt-tools.jsonl", [SHAREGPT_TOOLS] * 2)},
        {"path": write_jsonl(d / "reasoning.jsonl", [REASONING, per_turn])},
        {"path": write_jsonl(d / "dpo.jsonl", [DPO] * 2), "format": "dpo_chosen"},
    ]


def write_recipe(d: Path, model: Path, sources: list[dict], method: str) -> Path:
    raw = {
        "model": {"name_or_path": str(model)},
        "method": method,
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": sources, "max_length": 256},
        "train": {"max_steps": 2, "per_device_train_batch_size": 8, "report_to": [], "logging_steps": 1},
        "output_dir": str(d / "run"),
    }
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_loss_marking_on_a_terminal_is_colour(tok):
    ids = tok("a b", add_special_tokens=False)["input_ids"]
    assert mark_loss(tok, ids, [0] + [1] * (len(ids) - 1), colour=True) == "a\x1b[32m\x1b[1m b\x1b[0m"


def test_show_prints_samples_with_loss_marked(tmp_path, tiny_model, chat_sources):
    proc = run_cli("data", str(write_recipe(tmp_path, tiny_model, chat_sources[:2], "full")), "--show", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("tokens that carry loss are [[bracketed]]\n")
    assert out.count("--- sample 1: ") == 2 and "--- sample 2" not in out
    assert f"=== train source {chat_sources[1]['path']} (format: sharegpt)\n" in out
    assert out.count(GOLDEN_TOOLS) == 2


@pytest.mark.parametrize("method", ["full", "lora"])
def test_every_chat_layout_trains_and_generate_uses_the_chat_template(tmp_path, tiny_model, chat_sources, method):
    from transformers import AutoTokenizer

    from sftdist.generate import read_prompts
    from sftdist.prompt_style import read as read_style

    alpaca = {"path": write_jsonl(tmp_path / "alpaca.jsonl", [ALPACA_HISTORY])}
    kto = {"path": write_jsonl(tmp_path / "kto.jsonl", KTO), "format": "kto_good"}
    sources = chat_sources + ([alpaca, kto] if method == "full" else [])
    recipe = write_recipe(tmp_path, tiny_model, sources, method)
    proc = run_cli("train", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = tmp_path / "run" / "final"
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    if method == "full":  # the KTO row labelled bad
        assert f"warning: dropped 1 of 2 rows of {kto['path']}: 1 labelled bad" in proc.stderr
    tokenizer = AutoTokenizer.from_pretrained(final)
    (prompt,) = read_prompts(None, ["Weather in Paris?"], read_style(final), tokenizer)
    if method == "lora":  # trained on chat only: the prompt is a user turn of the chat template
        assert tokenizer.decode(prompt.ids) == "<s><|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    else:  # mixed with instruction rows: the prompt template
        assert tokenizer.decode(prompt.ids) == "<s>### Instruction:\nWeather in Paris?\n\n### Response:\n"


# --- files real exporters write; what the warnings and --show say --------------------------------------
def _part(kind: str, value: str) -> dict:
    return {"type": kind, "value": value}


# LLaMA-Factory v1's layout (their converters' output, and the layout of their demo sets
# llamafactory/v1-sft-demo and llamafactory/reason-tool-use-demo-1500): typed parts {type, value},
# reasoning and tool_call parts, a float loss_weight on every turn, tools as a JSON string.
LF_SFT = {"messages": [{"role": "user", "content": [_part("text", "Name a colour.")], "loss_weight": 0.0},
                       {"role": "assistant", "content": [_part("text", "Blue.")], "loss_weight": 1.0}]}
LF_TOOLS = {
    "messages": [
        {"role": "user", "content": [_part("text", "What is 6*8?")], "loss_weight": 0.0},
        {"role": "assistant", "loss_weight": 1.0, "content": [
            _part("reasoning", "I need to multiply."),
            _part("tool_call", json.dumps({"name": "multiply", "arguments": {"a": 6, "b": 8}})),
        ]},
        {"role": "tool", "content": [_part("text", "48")], "loss_weight": 0.0},
        {"role": "assistant", "content": [_part("reasoning", "Done."), _part("text", "6*8 is 48.")], "loss_weight": 1.0},
    ],
    "tools": json.dumps([{"type": "function", "function": {"name": "multiply", "parameters": {"type": "object"}}}]),
}
EMPTY_MID = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
                          {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]}
OPENAI_WEIGHT = {"messages": [  # OpenAI's fine-tuning layout: `weight` per assistant message
    {"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Hello", "weight": 0},
    {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye", "weight": 1, "refusal": None},
]}
HELLO = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
WORDS = " ".join(["one two three four five"] * 30)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("exported")
    bom = b"\xef\xbb\xbf"  # Windows tools start UTF-8 files with it
    (d / "bom.jsonl").write_bytes(bom + json.dumps({"instruction": "Say hi.", "response": "Hi."}).encode() + b"\n")
    (d / "one.json").write_bytes(bom + json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}, indent=2).encode())  # ONE conversation object
    return {
        "lf-sft": write_jsonl(d / "lf-sft.jsonl", [LF_SFT]),
        "lf-tools": write_jsonl(d / "lf-tools.jsonl", [LF_TOOLS]),
        "bom": str(d / "bom.jsonl"),
        "one": str(d / "one.json"),
        "empty-mid": write_jsonl(d / "empty-mid.jsonl", [{**EMPTY_MID, "id": 1}, {"messages": HELLO, "id": 2}]),
        "weight": write_jsonl(d / "weight.jsonl", [OPENAI_WEIGHT]),
        "long": write_jsonl(d / "long.jsonl", [  # kept, cut at max_length, cut to nothing to learn
            {"instruction": "Count.", "response": "one"}, {"instruction": "Count.", "response": WORDS},
            {"instruction": WORDS, "response": "five"},
        ]),
    }


def _data_recipe(d: Path, model: Path, paths: list[str], **data) -> str:
    raw = {"model": {"name_or_path": str(model)}, "data": {"train": [{"path": p} for p in paths], **data},
           "output_dir": str(d / "run")}
    (d / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return str(d / "recipe.yaml")


def test_show_masks_what_training_sees_for_exported_layouts(tmp_path, tiny_model, exported):
    keys = ["lf-sft", "lf-tools", "bom", "one", "empty-mid", "weight", "long"]
    recipe = _data_recipe(tmp_path, tiny_model, [exported[k] for k in keys], max_length=256, truncate=True)
    proc = run_cli("data", recipe, "--show", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n[[Blue.</s>]]\n" in out
    assert ('<|im_start|>assistant\n[[<think>\nI need to multiply.\n</think>\n<tool_call>\n{"name": "multiply", '
            '"arguments": {"a": 6, "b": 8}}\n</tool_call></s>]]\n<|im_start|>tool\n48<|im_end|>\n'
            "<|im_start|>assistant\n[[<think>\nDone.\n</think>\n6*8 is 48.</s>]]") in out
    assert "### Instruction:\nSay hi.\n\n### Response:\n[[Hi.</s>]]" in out  # the byte-order mark is not text
    assert f"=== train source {exported['one']} (format: sharegpt)\n--- sample 1: " in out
    # The empty turn and the weight-0 turn carry no loss; what follows them does.
    assert "<|im_start|>assistant\n</s>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n[[Goodbye</s>]]" in out
    assert "<|im_start|>assistant\nHello</s>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n[[Goodbye</s>]]" in out
    long = out.split(f"=== train source {exported['long']}")[1]
    assert "--- sample 2: 256 tokens of 317 (truncated to max_length 256), " in long
    assert "--- sample 3: 316 tokens, dropped in training: no loss-carrying token within max_length 256\n" in long


def test_warnings_count_each_row_once_and_come_back_on_every_run(tmp_path, tiny_model, exported):
    recipe = _data_recipe(tmp_path, tiny_model, [exported[k] for k in ("empty-mid", "weight", "long")],
                          max_length=256, truncate=True)
    runs = [run_cli("data", "--check", recipe) for _ in range(2)]  # the second reads the cache entry
    expected = [
        f"warning: {exported['empty-mid']}: ignoring column id",
        f"warning: kept all 2 rows of {exported['empty-mid']} with changes: 1 empty assistant turn(s) left out of the loss",
        f"warning: {exported['weight']}: ignoring key inside turns: name (in 1 turn)",
        f"warning: dropped 1 of 3 rows of {exported['long']}: 1 no loss-carrying token within max_length 256; "
        "kept with changes: 1 truncated to max_length 256",
    ]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout == "ok: 3 sources, 5 samples pass every check\n"
        assert proc.stderr.splitlines() == expected


def test_generate_says_which_prompts_file_rows_it_skips(tmp_path, tiny_model):
    rows = [{"instruction": "Say hi.", "response": "Hi."}, {"instruction": "Say bye.", "response": ""}]
    proc = run_cli("generate", str(tiny_model), "--prompts-file", write_jsonl(tmp_path / "p.jsonl", rows),
                   "--max-new-tokens", "1", "--greedy")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f"warning: dropped 1 of 2 rows of {tmp_path / 'p.jsonl'}: 1 empty response",
        "sftdist generate: prompts rendered through the prompt template 'default' (no sftdist_prompt.json beside "
        "the model)",
        "sftdist generate: on the CPU in float32 (no GPU visible)",
    ]
    assert "--- prompt 1: " in proc.stdout and "--- prompt 2" not in proc.stdout


def test_work_on_a_long_conversation_is_bounded_by_max_length(tok):
    """10,000 turns rendered prefix by prefix took minutes before being dropped; past max_length no turn
    is located, and a cut conversation's mask is the one of the whole conversation, cut. The work is counted
    in template renders (the real method, counted), not timed: a time depends on the machine and its load."""
    from sftdist.data.chat import encode_chat
    from sftdist.data.templates import CHATML_TEXT

    def chat(n: int):
        turns = [{"role": r, "content": f"{r} {i}"} for i in range(n) for r in ("user", "assistant")]
        return render_rows([{"messages": turns}], ["line 1"], "auto", "default", "f.jsonl").examples[0]

    saved, render = tok.chat_template, tok.apply_chat_template
    renders = []

    def counted(*args, **kwargs):
        renders.append(1)
        return render(*args, **kwargs)

    tok.chat_template = CHATML_TEXT  # no generation markers: the prefix-by-prefix fallback
    tok.apply_chat_template = counted
    try:
        dropped = Encoder(tok, 256, "completion", False, stop_token_ids(tok)).encode([chat(5000)], "f.jsonl")
        cut = Encoder(tok, 256, "completion", True, stop_token_ids(tok)).encode([chat(5000)], "f.jsonl")
        bounded = len(renders)
        assert dropped.dropped == {"longer than max_length 256": 1} and not dropped.input_ids
        assert cut.truncated == 1 and len(cut.input_ids[0]) == 256
        # Each of the 5,000 assistant turns located would take about 3 renders per conversation (15,000 x 2);
        # 256 tokens hold a few dozen turns.
        assert 0 < bounded < 500, bounded
        ids, mask = encode_chat(tok, chat(40), stop_token_ids(tok), "f.jsonl")  # unbounded
        assert len(ids) > 256 and (cut.input_ids[0], cut.completion_mask[0]) == (ids[:256], mask[:256])
    finally:
        tok.chat_template = saved
        del tok.apply_chat_template  # the class's method again
