"""Chat examples -> token ids + a loss mask over exactly the assistant turns that carry loss.

Which tokens are an assistant's, in order of preference:
1. `{% generation %}` markers in the tokenizer's chat template (transformers' assistant mask);
2. trl's training template for the model family when the tokenizer's template is a known one
   (Qwen3, Qwen2.5, Llama 3, Gemma, gpt-oss, Phi-3, DeepSeek, ...): same rendering, plus markers,
   and prefix-stable even where the original drops earlier turns' reasoning;
3. rendering the conversation prefix by prefix (any prefix-stable template without markers).

Gap filled: trl masks assistant tokens only with markers, and refuses a template it cannot patch;
here the prefix fallback covers the rest, turns can be excluded one by one (`loss_weight: 0`), a
template that drops tool calls or reasoning is an error rather than silent text, and every trained
turn must contain a stop token. The work per conversation is bounded by `max_length`: turns are
located only as far as training keeps tokens, so a 10,000-turn row costs one render, not 10,000.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sftdist.data.formats import Example
from sftdist.data.templates import CHAT_TEMPLATES, training_families, training_template
from sftdist.errors import UserError

FIX = "set data.chat_template to one that does (chatml, a model family such as qwen2_5, or a .jinja file)"

# Templates the recipe chose (data.chat_template) -> the setting, so that a refusal names what the recipe set.
_CHOSEN: dict[str, str] = {}
_CHOSEN_NAME = "data.chat_template "  # how a refusal names one of them

# (tokenizer, chat template) -> (template whose markers give the mask, or None for prefix rendering; its name)
_MASK_TEMPLATES: dict[tuple[str, str], tuple[str | None, str]] = {}


def set_chat_template(tokenizer: Any, setting: str | None, where: str) -> None:
    """Apply `data.chat_template`: auto (or null) keeps the tokenizer's; chatml, a family or a .jinja replace it.

    A family sets trl's training template, so the saved tokenizer renders prompts the same way.
    """
    if setting in (None, "auto"):
        return
    if setting in CHAT_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATES[setting]
    elif setting in training_families():
        tokenizer.chat_template = training_template(setting)
    else:
        path = Path(setting)
        if not path.is_file():
            raise UserError(f"{where}: data.chat_template file {setting} does not exist")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    _CHOSEN[_template(tokenizer)] = setting


def _fix(name: str) -> str:
    """What to do about a template that cannot train these rows: choose one, or another than the recipe's."""
    if not name.startswith(_CHOSEN_NAME):
        return FIX
    chosen = name.removeprefix(_CHOSEN_NAME)
    if chosen in CHAT_TEMPLATES:
        others = "a model family such as qwen2_5, or a .jinja file"
    elif chosen in training_families():
        others = "chatml, another model family, or a .jinja file"
    else:
        others = "chatml, a model family such as qwen2_5, or another .jinja file"
    return f"set data.chat_template to another that does ({others})"


def _template(tokenizer: Any) -> str:
    tpl = tokenizer.chat_template
    return tpl["default"] if isinstance(tpl, dict) else tpl


def mask_template(tokenizer: Any) -> tuple[str | None, str]:
    """The template whose `{% generation %}` markers locate assistant tokens (None: prefix rendering), and its name."""
    from jinja2 import TemplateError
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    tpl = _template(tokenizer)
    key = (tokenizer.name_or_path, tpl)
    if key in _MASK_TEMPLATES:
        return _MASK_TEMPLATES[key]
    chosen = _CHOSEN.get(tpl)
    own = f"{_CHOSEN_NAME}{chosen}" if chosen else f"the chat template of {tokenizer.name_or_path or 'the tokenizer'}"
    if has_generation_markers(tpl):
        found: tuple[str | None, str] = (tpl, own)
    else:
        try:
            training = get_training_chat_template(tokenizer)
        except (ValueError, TypeError, TemplateError):
            training = None  # not a family trl knows: prefix rendering
        family = next((f for f in training_families() if training and training_template(f) == training), None)
        found = (training, f"trl's {family} training template") if training else (None, own)
    _MASK_TEMPLATES[key] = found
    return found


def _render(tokenizer: Any, ex: Example, n: int, tpl: str | None, gen_prompt: bool = False) -> str:
    kwargs = {"tools": ex.tools} if ex.tools else {}
    return tokenizer.apply_chat_template(
        ex.messages[:n], tokenize=False, add_generation_prompt=gen_prompt, chat_template=tpl, **kwargs
    )


def _not_prefix_stable(where: str, name: str) -> UserError:
    return UserError(
        f"{where}: {name} does not render conversations prefix by prefix, so assistant turns cannot be "
        f"located; {_fix(name)}"
    )


def _turn_span(
    tokenizer: Any, ex: Example, i: int, tpl: str | None, full: str, name: str, where: str, whole: bool = False
) -> tuple[int, int]:
    """Character span of turn i: from after its generation prompt (or its start, `whole`) to its end.

    A generation prompt that is not a prefix of the rendered turn (one ending in `<think>\\n\\n`
    while the turn renders `<think>\\nreasoning`) would start the loss inside the turn: the loss
    starts where the two part, so that everything the model writes is trained.
    """
    before = _render(tokenizer, ex, i, tpl, gen_prompt=not whole)
    upto = _render(tokenizer, ex, i + 1, tpl)
    if not full.startswith(upto) or (whole and not upto.startswith(before)):
        raise _not_prefix_stable(where, name)
    if upto.startswith(before):
        return len(before), len(upto)
    start = len(os.path.commonprefix([before, upto]))
    if start < len(_render(tokenizer, ex, i, tpl)):  # the earlier turns render differently: not prefix-stable
        raise _not_prefix_stable(where, name)
    return start, len(upto)


def _spans(
    tokenizer: Any, ex: Example, turns: list[int], tpl: str | None, full: str, name: str, where: str, cut: int, whole: bool
) -> list[tuple[int, int]]:
    """Spans of the given turns, in order, stopping at the first that starts at or after character
    `cut` (tokens past max_length, which training never sees: the work stays bounded)."""
    spans = []
    for i in turns:
        span = _turn_span(tokenizer, ex, i, tpl, full, name, where, whole=whole)
        if span[0] >= cut:
            break
        spans.append(span)
    return spans


def _check_rendered(ex: Example, full: str, name: str, where: str) -> None:
    """A template that ignores tools, tool calls, tool results or reasoning would train them as
    nothing: refuse it by name. Each message's strings are looked for after the previous
    message's, so the search is linear in the conversation."""

    def at(text: str, start: int) -> int:
        # A template may write a string through `tojson`: its escaped form counts as rendered too.
        for form in (text, json.dumps(text)[1:-1]):
            pos = full.find(form, start)
            pos = full.find(form) if pos < 0 and start else pos
            if pos >= 0:
                return pos
        return -1

    def check(wanted: list[tuple[str, str]], start: int) -> list[int]:
        found = [at(text, start) for _, text in wanted]
        missing = next((w for w, pos in zip(wanted, found) if pos < 0), None)
        if missing:
            raise UserError(f"{where}: {name} does not render {missing[0]} ({missing[1]!r} is missing); {_fix(name)}")
        return found

    check([("tools", t["function"]["name"]) for t in ex.tools or []], 0)
    cursor = 0
    for m in ex.messages:
        wanted = [("tool calls", c["function"]["name"]) for c in m.get("tool_calls", [])]
        if m["role"] == "tool" and m["content"].strip():
            wanted.append(("tool results", m["content"].strip()[:40]))
        if m.get("reasoning_content", "").strip():
            wanted.append(("reasoning", m["reasoning_content"].strip()[:40]))
        if wanted:
            cursor = max(cursor, min(check(wanted, cursor)))


def encode_chat(
    tokenizer: Any, ex: Example, stop_ids: set[int], where: str, max_length: int | None = None, truncate: bool = False
) -> tuple[list[int], list[int] | None]:
    """Token ids of a conversation and its mask: 1 on the tokens of assistant turns that carry loss.

    Past `max_length` tokens the turns are not located: with `truncate` the mask covers the first
    `max_length` tokens only (training cuts there), without it the mask is None (training drops the
    conversation). The ids are always the whole conversation's.
    """
    from jinja2 import TemplateError

    if not tokenizer.chat_template:
        raise UserError(
            f"{where}: chat rows need a chat template, and the tokenizer of {tokenizer.name_or_path} has none; "
            "set data.chat_template (e.g. chatml)"
        )
    tpl, name = mask_template(tokenizer)
    loss = ex.loss or [m["role"] == "assistant" for m in ex.messages]  # default: every assistant turn
    assistant = [i for i, m in enumerate(ex.messages) if m["role"] == "assistant"]
    try:
        full = _render(tokenizer, ex, len(ex.messages), tpl)
        _check_rendered(ex, full, name, where)
        if tpl is not None:
            out = tokenizer.apply_chat_template(
                ex.messages, chat_template=tpl, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                **({"tools": ex.tools} if ex.tools else {}),
            )
            ids, marks, offsets = list(out["input_ids"]), list(out["assistant_masks"]), out.encodings[0].offsets
        else:
            enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
        keep, cut = len(ids), len(full)
        if max_length is not None and len(ids) > max_length:
            if not truncate:
                return ids, None
            keep, cut = max_length, offsets[max_length][0]
        if tpl is not None:
            off = [i for i in assistant if not loss[i]]
            excluded = _spans(tokenizer, ex, off, tpl, full, name, where, cut, whole=True)
            mask = [0 if any(s <= a < e for s, e in excluded) else k for k, (a, _) in zip(marks[:keep], offsets)]
        else:
            spans = _spans(tokenizer, ex, [i for i in assistant if loss[i]], tpl, full, name, where, cut, whole=False)
            mask = [1 if any(s <= a < e for s, e in spans) else 0 for a, _ in offsets[:keep]]
    except TemplateError as e:
        raise UserError(f"{where}: {name} cannot render this conversation ({e}); {_fix(name)}") from None
    if keep == len(ids) and not any(t in stop_ids for t, m in zip(ids, mask) if m):
        raise UserError(
            f"{where}: {name} ends assistant turns without the EOS token {tokenizer.eos_token!r}, so the model "
            f"would never learn to stop; {_fix(name)}"
        )
    return ids, mask
