"""Detect each source's format from its columns and render rows into one of three shapes.

- `text`: a whole string, trained on whole.
- `instruction`: a prompt string (rendered through a named template) and a completion string.
- `chat`: a list of `{role, content}` turns, rendered later by the tokenizer's chat template.

Gap filled: trl accepts several of these shapes, but not dolly/alpaca/sharegpt, not a mix of
shapes in one run, and it reports a bad row as a pyarrow or KeyError traceback. Here every row is
checked once, and a bad one is reported by file and row number.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sftdist.data.templates import PROMPT_TEMPLATES
from sftdist.errors import UserError

# format -> (required columns, optional columns); detection tries them in this order.
FORMAT_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),
    "sharegpt": (("conversations",), ()),
    "prompt_completion": (("prompt", "completion"), ()),
    "dolly": (("instruction", "response"), ("context", "category")),
    "alpaca": (("instruction", "output"), ("input",)),
    "text": (("text",), ()),
}
CHAT_FORMATS = ("messages", "sharegpt")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Example:
    """One rendered training sample; `kind` says which fields are set."""

    kind: str  # "text" | "instruction" | "chat"
    text: str = ""
    prompt: str = ""
    completion: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Rendered:
    """A source's rendered examples, and the rows dropped with the reason for each."""

    format: str
    examples: list[Example]
    dropped: Counter = field(default_factory=Counter)
    labels: list[str] = field(default_factory=list)  # the row label ("line 7") of each kept example


def detect_format(columns: list[str], where: str) -> str:
    """The first format whose required columns are all present."""
    cols = set(columns)
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


def _chat_turns(row: dict[str, Any], fmt: str, where: str) -> list[dict[str, str]]:
    key = "messages" if fmt == "messages" else "conversations"
    turns = row.get(key)
    if not isinstance(turns, list):
        raise UserError(f"{where}: field '{key}' is a {type(turns).__name__}, expected a list of turns")
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: {key}[{j}] is a {type(turn).__name__}, expected a mapping")
        if fmt == "messages":
            role, content = turn.get("role"), turn.get("content")
            if role not in ROLES:
                raise UserError(f"{where}: {key}[{j}] has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        else:
            who, content = turn.get("from"), turn.get("value")
            if who not in SHAREGPT_ROLES:
                raise UserError(
                    f"{where}: {key}[{j}] has unknown 'from' {who!r}; expected one of {', '.join(SHAREGPT_ROLES)}"
                )
            role = SHAREGPT_ROLES[who]
        if not isinstance(content, str):
            raise UserError(f"{where}: {key}[{j}] content is a {type(content).__name__}, expected a string")
        out.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing would carry loss")
    if out[-1]["role"] != "assistant":
        raise UserError(f"{where}: the conversation ends on a {out[-1]['role']} turn; expected it to end on an assistant turn")
    return out


def render_row(row: dict[str, Any], fmt: str, template: str, where: str) -> Example | None:
    """Render one row; None means 'drop it: empty response' (counted by the caller)."""
    if fmt == "text":
        text = _field(row, "text", where)
        return Example("text", text=text) if text.strip() else None
    if fmt in CHAT_FORMATS:
        turns = _chat_turns(row, fmt, where)
        if not any(t["content"].strip() for t in turns if t["role"] == "assistant"):
            return None
        return Example("chat", messages=turns)
    if fmt == "prompt_completion":
        prompt, completion = _field(row, "prompt", where), _field(row, "completion", where)
    elif fmt == "dolly":
        tpl = PROMPT_TEMPLATES[template]
        prompt = tpl.render(_field(row, "instruction", where), _field(row, "context", where, optional=True))
        completion = _field(row, "response", where)
    elif fmt == "alpaca":
        tpl = PROMPT_TEMPLATES[template]
        prompt = tpl.render(_field(row, "instruction", where), _field(row, "input", where, optional=True))
        completion = _field(row, "output", where)
    else:
        raise UserError(f"{where}: unknown format {fmt!r}")
    if not completion.strip():
        return None
    return Example("instruction", prompt=prompt, completion=completion)


def render_rows(rows: list[dict[str, Any]], labels: list[str], fmt: str, template: str, where: str) -> Rendered:
    """Detect (if `auto`) and render rows of one source (a chunk of it); `labels` name each row in errors."""
    if fmt == "auto":
        fmt = detect_format(list(rows[0].keys()), where)
    rendered = Rendered(format=fmt, examples=[])
    for row, label in zip(rows, labels):
        ex = render_row(row, fmt, template, f"{where} {label}")
        if ex is None:
            rendered.dropped["empty response"] += 1
        else:
            rendered.examples.append(ex)
            rendered.labels.append(label)
    return rendered
