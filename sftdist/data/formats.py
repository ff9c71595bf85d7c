"""Detect each source's format from its columns and render rows into one of three shapes.

- `text`: a whole string, trained on whole.
- `instruction`: a prompt string (rendered through a named template) and a completion string.
- `chat`: a list of turns (role, content, tool calls, reasoning) plus the row's tool schemas,
  rendered later by a chat template (data/chat.py), with a per-turn flag saying which carry loss.

Gap filled: trl accepts several of these shapes, but not dolly/alpaca/sharegpt, not LLaMA-Factory's
function_call/observation turns or its v1 typed parts, not a mix of shapes in one run, and it
reports a bad row as a pyarrow or KeyError traceback. Here every row is checked once, a bad one is
reported by file and row, and nothing is dropped silently: the columns and turn keys not used, and
the empty assistant turns left out of the loss, are counted for the source's report (data/notices.py
words them).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sftdist.data.templates import PROMPT_TEMPLATES
from sftdist.errors import UserError

# format -> (required columns, optional columns); detection tries them in this order.
FORMAT_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ("tools",)),
    "sharegpt": (("conversations",), ("system", "tools")),
    "prompt_completion": (("prompt", "completion"), ()),
    "dolly": (("instruction", "response"), ("context",)),
    "alpaca": (("instruction", "output"), ("input", "system", "history")),
    "text": (("text",), ()),
}
CHAT_FORMATS = ("messages", "sharegpt")
# Source formats that select what to train on from preference or labelled rows, then detect the layout.
SELECT_FORMATS = ("dpo_chosen", "kto_good")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
MEDIA_COLUMNS = ("images", "videos", "audios")
MEDIA_PARTS = ("image", "image_url", "input_image", "audio", "input_audio", "audio_url", "video", "video_url")
KTO_LABELS = ("label", "kto_tag")
TEXT_ONLY = "sftdist trains text-only models"
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# Per-turn loss flags: ours, OpenAI fine-tuning's `weight`, LLaMA-Factory's `loss_weight`, axolotl's `train`.
LOSS_KEYS = ("loss_weight", "weight", "train")
# Keys a turn may carry, by role, beside the loss flags; any other key with a value is counted as unused.
TURN_KEYS = {
    "messages": {
        "assistant": {"role", "content", "tool_calls", *REASONING_KEYS},
        "tool": {"role", "content", "name", "tool_call_id"},
    },
    "sharegpt": {"assistant": {"from", "value", *REASONING_KEYS}},
}
# Typed content parts: a text part holds `text` (OpenAI, transformers) or `value` (LLaMA-Factory v1).
PART_TYPES = ("text", "reasoning", "tool_call", "tool_calls")
EMPTY_TURNS = "empty assistant turn(s) left out of the loss"


@dataclass
class Example:
    """One rendered training sample; `kind` says which fields are set.

    For chat, `loss[i]` says whether messages[i] carries loss (only assistant turns may), and
    `tools` is passed to the chat template's `tools` argument.
    """

    kind: str  # "text" | "instruction" | "chat"
    text: str = ""
    prompt: str = ""
    completion: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    loss: list[bool] = field(default_factory=list)
    # What the row held that the sample does not train on, for the source's report.
    empty_turns: int = 0  # empty assistant turns left out of the loss
    unused_keys: Counter = field(default_factory=Counter)  # turn key -> turns holding it, that nothing renders


@dataclass
class Rendered:
    """A source's rendered examples, the rows dropped with the reason for each, and what the kept
    rows held that is not trained on (columns no format uses; the examples' counts summed)."""

    format: str
    examples: list[Example]
    dropped: Counter = field(default_factory=Counter)
    labels: list[str] = field(default_factory=list)  # the row label ("line 7") of each kept example
    ignored_columns: list[str] = field(default_factory=list)
    changed: Counter = field(default_factory=Counter)  # {EMPTY_TURNS: turns}
    ignored_keys: Counter = field(default_factory=Counter)


def is_row(keys: Any) -> bool:
    """Whether a JSON object with these keys is one row of a known format (not a wrapper of rows)."""
    cols = set(keys)
    return {"chosen", "rejected"} <= cols or any(set(required) <= cols for required, _ in FORMAT_COLUMNS.values())


def detect_format(columns: list[str], where: str) -> str:
    """The first format whose required columns are all present (preference rows are refused)."""
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        raise UserError(
            f"{where}: columns 'chosen' and 'rejected': this is preference (DPO) data, not SFT data; "
            "set format: dpo_chosen on this source to train on the chosen responses"
        )
    for name, (required, _) in FORMAT_COLUMNS.items():
        if set(required) <= cols:
            return name
    accepted = "; ".join(f"{n} ({', '.join(r)})" for n, (r, _) in FORMAT_COLUMNS.items())
    raise UserError(
        f"{where}: columns {sorted(cols)} match no known format; accepted formats (required columns): {accepted}"
    )


def _field(row: dict[str, Any], key: str, where: str, optional: bool = False) -> str:
    if key not in row or row[key] is None:
        if optional:
            return ""
        raise UserError(f"{where}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' is a {type(value).__name__}, expected a string")
    return value


def _json(value: Any, what: str, where: str) -> Any:
    """Parse a JSON string (LLaMA-Factory and OpenAI store tools and arguments as strings)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: {what} is not valid JSON ({e.msg} at column {e.colno})") from None


def _parts(value: Any, role: str, where: str) -> tuple[str, str, list[dict[str, Any]]]:
    """A turn's text, reasoning and tool calls: from a string, or from typed parts.

    Parts are `{type: text, text}` (OpenAI, transformers) or LLaMA-Factory v1's `{type, value}` with
    types text, reasoning and tool_call (a JSON `{name, arguments}`); text parts are joined as they
    are, reasoning parts one per line. Media parts are refused (text-only package).
    """
    if value is None:
        return "", "", []
    if isinstance(value, str):
        return value, "", []
    if not isinstance(value, list):
        raise UserError(f"{where} content is a {type(value).__name__}, expected a string or a list of typed parts")
    texts: dict[str, list[str]] = {"text": [], "reasoning": []}
    calls: list[dict[str, Any]] = []
    for k, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            raise UserError(f"{where} content[{k}] is a media part ({kind}); {TEXT_ONLY}, so remove media from this data")
        body = part.get("text", part.get("value")) if kind in PART_TYPES else None
        if not isinstance(body, (str, dict, list)) or (kind in ("text", "reasoning") and not isinstance(body, str)):
            raise UserError(
                f"{where} content[{k}] is {part!r}; expected a part {{type: text, text: ...}} or "
                f"{{type: text|reasoning|tool_call, value: ...}}"
            )
        if kind != "text" and role != "assistant":
            raise UserError(f"{where} content[{k}] is a {kind} part in a {role} turn; only assistant turns hold {kind}")
        if kind in ("tool_call", "tool_calls"):
            calls += _tool_calls(body, f"{where} content[{k}]")
        else:
            texts[kind].append(body)
    return "".join(texts["text"]), "\n".join(texts["reasoning"]), calls


def _tools(row: dict[str, Any], where: str) -> list[dict[str, Any]] | None:
    """The row's tool schemas as `[{type: function, function: {name, ...}}]`, or None."""
    tools = _json(row.get("tools"), "field 'tools'", where)
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise UserError(f"{where}: field 'tools' is {type(tools).__name__}; expected a list of JSON schemas")
    out = []
    for t in tools:
        fn = t.get("function", t)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise UserError(f"{where}: a tool in 'tools' has no name; expected {{name, description, parameters}}")
        out.append({"type": "function", "function": fn})
    return out


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls as `[{type: function, function: {name, arguments: dict}}]` (arguments parsed from JSON)."""
    calls = _json(value, "the tool call", where)
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list):
        raise UserError(f"{where}: tool calls are a {type(calls).__name__}; expected a list of {{name, arguments}}")
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise UserError(f"{where}: tool call {call!r} has no function name; expected {{name, arguments}}")
        args = _json(fn.get("arguments", {}), f"the arguments of tool call '{fn['name']}'", where)
        if not isinstance(args, dict):
            raise UserError(f"{where}: the arguments of tool call '{fn['name']}' are not a JSON object")
        norm: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            norm["id"] = call["id"]
        out.append(norm)
    return out


def _turn_loss(turn: dict[str, Any], role: str, where: str) -> bool:
    """Whether a turn carries loss: assistant turns do unless `loss_weight: 0`, `weight: 0` (OpenAI's
    fine-tuning layout) or `train: false`.

    Weights are 0 or 1 only: trl's loss takes a 0/1 mask, so a fractional weight would be silently
    rounded; it is refused instead, and so are flags that disagree.
    """
    flags = {}
    for key in ("loss_weight", "weight"):
        w = turn.get(key)
        if w is not None:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
                raise UserError(f"{where} {key} is {w!r}; only 0 or 1 is supported (a 0/1 loss mask per turn)")
            flags[key] = w == 1
    if turn.get("train") is not None:
        if not isinstance(turn["train"], bool):
            raise UserError(f"{where} train is {turn['train']!r}; expected true or false")
        flags["train"] = turn["train"]
    if len(set(flags.values())) > 1:
        raise UserError(f"{where} has loss flags that disagree ({', '.join(f'{k}: {turn[k]}' for k in flags)})")
    train = next(iter(flags.values()), role == "assistant")
    if train and role != "assistant":
        raise UserError(f"{where} is a {role} turn marked to carry loss; only assistant turns can")
    return train


def _unused_keys(turn: dict[str, Any], fmt: str, role: str) -> list[str]:
    """Keys of a turn that hold a value and that nothing renders (OpenAI's `name`, `refusal`, ...)."""
    used = TURN_KEYS[fmt].get(role, {"role", "content"} if fmt == "messages" else {"from", "value"})
    return [k for k, v in turn.items() if k not in used and k not in LOSS_KEYS and v not in (None, "", [], {})]


def _chat_turns(
    row: dict[str, Any], fmt: str, where: str
) -> tuple[list[dict[str, Any]], list[bool], Counter]:
    """The row's turns as chat messages, whether each carries loss, and the unused turn keys counted."""
    key = "messages" if fmt == "messages" else "conversations"
    turns = row.get(key)
    if not isinstance(turns, list):
        raise UserError(f"{where}: field '{key}' is a {type(turns).__name__}, expected a list of turns")
    out: list[dict[str, Any]] = []
    loss: list[bool] = []
    unused: Counter = Counter()
    system = _field(row, "system", where, optional=True) if fmt == "sharegpt" else ""
    if system.strip() and not (turns and isinstance(turns[0], dict) and turns[0].get("from") == "system"):
        out.append({"role": "system", "content": system})
        loss.append(False)
    for j, turn in enumerate(turns):
        at = f"{where}: {key}[{j}]"
        if not isinstance(turn, dict):
            raise UserError(f"{at} is a {type(turn).__name__}, expected a mapping")
        reasoning = ""
        if fmt == "messages":
            role, raw = turn.get("role"), turn.get("content")
            if role not in ROLES:
                raise UserError(f"{at} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
            text, reasoning, calls = _parts(raw, role, at)
            msg: dict[str, Any] = {"role": role, "content": text}
            if role == "assistant" and turn.get("tool_calls"):
                calls = _tool_calls(turn["tool_calls"], at) + calls
            elif raw is None and role != "assistant":
                raise UserError(f"{at} content is missing; expected a string")
            if calls:
                msg["tool_calls"] = calls
            if role == "tool":
                for k in ("name", "tool_call_id"):
                    if isinstance(turn.get(k), str):
                        msg[k] = turn[k]
        else:
            who, value = turn.get("from"), turn.get("value")
            if who not in SHAREGPT_ROLES:
                raise UserError(f"{at} has unknown 'from' {who!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
            if not isinstance(value, str):
                raise UserError(f"{at} value is a {type(value).__name__}, expected a string")
            role = SHAREGPT_ROLES[who]
            if who == "function_call":
                msg = {"role": role, "content": "", "tool_calls": _tool_calls(value, at)}
            else:
                msg = {"role": role, "content": value}
        if role == "assistant":
            given = [k for k in REASONING_KEYS if turn.get(k)]
            if given and reasoning:
                raise UserError(f"{at} holds reasoning both in '{given[0]}' and in a reasoning part; keep one")
            if given:
                reasoning = turn[given[0]]
                if not isinstance(reasoning, str):
                    raise UserError(f"{at} reasoning is a {type(reasoning).__name__}, expected a string")
                unused.update(given[1:])
            if reasoning:
                msg["reasoning_content"] = reasoning  # transformers also passes it as `thinking` (gpt-oss)
        unused.update(_unused_keys(turn, fmt, role))
        out.append(msg)
        loss.append(_turn_loss(turn, role, at))
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing would carry loss")
    if out[-1]["role"] != "assistant":
        raise UserError(f"{where}: the conversation ends on a {out[-1]['role']} turn; expected it to end on an assistant turn")
    return out, loss, unused


def _alpaca_prompt(row: dict[str, Any], template: str, where: str) -> str:
    """System text, then each `history` pair as an earlier prompt + answer, then the instruction.

    History answers are part of the prompt, so only the final output carries loss.
    """
    tpl = PROMPT_TEMPLATES[template]
    system = _field(row, "system", where, optional=True).strip()
    parts = [system + "\n\n"] if system else []
    history = row.get("history") or []
    if not isinstance(history, list):
        raise UserError(f"{where}: field 'history' is a {type(history).__name__}; expected [[instruction, output], ...]")
    for k, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise UserError(f"{where}: history[{k}] is {pair!r}; expected [instruction, output] (two strings)")
        parts.append(tpl.render(pair[0]) + pair[1].strip() + "\n\n")
    parts.append(tpl.render(_field(row, "instruction", where), _field(row, "input", where, optional=True)))
    return "".join(parts)


def _has_output(turn: dict[str, Any]) -> bool:
    return bool(turn["content"].strip() or turn.get("tool_calls") or turn.get("reasoning_content", "").strip())


def _has_media(row: dict[str, Any]) -> str | None:
    return next((c for c in MEDIA_COLUMNS if row.get(c)), None)


def render_row(row: dict[str, Any], fmt: str, template: str, where: str) -> Example | None:
    """Render one row; None means 'drop it: empty response' (counted by the caller)."""
    media = _has_media(row)
    if media:
        raise UserError(f"{where}: field '{media}' holds media; {TEXT_ONLY}, so remove that column or these rows")
    if fmt == "text":
        text = _field(row, "text", where)
        return Example("text", text=text) if text.strip() else None
    if fmt in CHAT_FORMATS:
        turns, loss, unused = _chat_turns(row, fmt, where)
        # An empty assistant turn would teach the model to stop at once: it carries no loss (counted).
        empty = [i for i, t in enumerate(turns) if loss[i] and not _has_output(t)]
        if len(empty) == sum(loss):
            return None
        for i in empty:
            loss[i] = False
        tools = _tools(row, where)
        return Example("chat", messages=turns, tools=tools, loss=loss, empty_turns=len(empty), unused_keys=unused)
    if fmt == "prompt_completion":
        prompt, completion = _field(row, "prompt", where), _field(row, "completion", where)
    elif fmt == "dolly":
        tpl = PROMPT_TEMPLATES[template]
        prompt = tpl.render(_field(row, "instruction", where), _field(row, "context", where, optional=True))
        completion = _field(row, "response", where)
    elif fmt == "alpaca":
        prompt = _alpaca_prompt(row, template, where)
        completion = _field(row, "output", where)
    else:
        raise UserError(f"{where}: unknown format {fmt!r}")
    if not completion.strip():
        return None
    return Example("instruction", prompt=prompt, completion=completion)


def _chosen_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A preference row (DPO: chosen/rejected) as the SFT row of its chosen response."""
    chosen = row.get("chosen")
    rest = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
    if chosen is None:
        raise UserError(f"{where}: missing field 'chosen'")
    if "conversations" in row:  # LLaMA-Factory sharegpt: chosen is one {from, value} turn
        turns = chosen if isinstance(chosen, list) else [chosen]
        return {**rest, "conversations": list(row["conversations"] or []) + turns}
    if "instruction" in row:  # LLaMA-Factory alpaca
        return {**rest, "output": chosen}
    prompt = rest.pop("prompt", None)
    if isinstance(chosen, list):  # trl conversational, with or without an explicit prompt
        return {**rest, "messages": list(prompt or []) + chosen}
    if isinstance(chosen, str):
        return {**rest, "prompt": prompt, "completion": chosen} if prompt is not None else {**rest, "text": chosen}
    raise UserError(f"{where}: field 'chosen' is a {type(chosen).__name__}; expected a string, a turn or a list of turns")


def _kto_label(row: dict[str, Any]) -> str | None:
    return next((k for k in KTO_LABELS if isinstance(row.get(k), bool)), None)


def render_rows(rows: list[dict[str, Any]], labels: list[str], fmt: str, template: str, where: str) -> Rendered:
    """Detect (if `auto`) and render rows of one source (a chunk of it); `labels` name each row in errors.

    `dpo_chosen` trains on the chosen response of preference rows, `kto_good` keeps the rows whose
    boolean label is true; both then detect the layout. Under `auto` such rows are refused.
    """
    select = fmt if fmt in SELECT_FORMATS else None
    dropped: Counter = Counter()
    if select == "dpo_chosen":
        rows = [_chosen_row(r, f"{where} {label}") for r, label in zip(rows, labels)]
    elif select == "kto_good":
        key = _kto_label(rows[0])
        if key is None:
            raise UserError(f"{where}: format kto_good needs a true/false column 'label' or 'kto_tag'")
        kept = [(r, label) for r, label in zip(rows, labels) if r.get(key) is True]
        dropped["labelled bad"] += len(rows) - len(kept)
        if not kept:  # a chunk of bad rows; the pipeline says so if the whole source is
            return Rendered(format=detect_format(list(rows[0].keys()), where), examples=[], dropped=dropped)
        rows = [{k: v for k, v in r.items() if k != key} for r, _ in kept]
        labels = [label for _, label in kept]
    if fmt in ("auto", *SELECT_FORMATS):
        fmt = detect_format(list(rows[0].keys()), where)
        if select is None and _kto_label(rows[0]):
            raise UserError(
                f"{where}: column '{_kto_label(rows[0])}' is true/false: this is labelled (KTO) data, and rows "
                "labelled bad would be trained as targets; set format: kto_good on this source to train on the good rows"
            )
    required, optional = FORMAT_COLUMNS[fmt]
    used = {*required, *optional, *MEDIA_COLUMNS}
    ignored = sorted({c for r in rows for c in r} - used)
    rendered = Rendered(format=fmt, examples=[], dropped=dropped, ignored_columns=ignored)
    for row, label in zip(rows, labels):
        ex = render_row(row, fmt, template, f"{where} {label}")
        if ex is None:
            rendered.dropped["empty response"] += 1
        else:
            rendered.examples.append(ex)
            rendered.labels.append(label)
            rendered.changed[EMPTY_TURNS] += ex.empty_turns
            rendered.ignored_keys.update(ex.unused_keys)
    return rendered
