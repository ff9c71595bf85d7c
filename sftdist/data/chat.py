"""Chat examples -> token ids + a loss mask over exactly the assistant turns that carry loss.

Which tokens are an assistant's, in order of preference:
1. `{% generation %}` markers in the tokenizer's chat template (transformers' assistant mask);
2. trl's training template for the model family when the tokenizer's template is a known one
   (Qwen3, Qwen2.5, Llama 3, Gemma, gpt-oss, Phi-3, DeepSeek, ...): same rendering, plus markers,
   and prefix-stable even where the original drops earlier turns' reasoning;
3. rendering the conversation prefix by prefix (any prefix-stable template without markers).

Gap filled: trl masks assistant tokens only with markers, and refuses a template it cannot patch;
here the prefix fallback covers the rest, turns can be excluded one by one (`loss_weight: 0`), a
template that drops tool calls is an error rather than silent text, and every trained turn must
contain a stop token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftdist.data.formats import Example
from sftdist.data.templates import CHAT_TEMPLATES, training_families, training_template
from sftdist.errors import UserError

FIX = "set data.chat_template to one that does (a model family such as qwen2_5, or a .jinja file)"

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
    own = f"the chat template of {tokenizer.name_or_path or 'the tokenizer'}"
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
        "located; use a template with {% generation %} markers, a model family (e.g. qwen3) or chatml in data.chat_template"
    )


def _turn_span(
    tokenizer: Any, ex: Example, i: int, tpl: str | None, full: str, name: str, where: str, whole: bool = False
) -> tuple[int, int]:
    """Character span of turn i: from after its generation prompt (or its start, `whole`) to its end."""
    before = _render(tokenizer, ex, i, tpl, gen_prompt=not whole)
    upto = _render(tokenizer, ex, i + 1, tpl)
    start = len(before)
    if not full.startswith(upto) or start > len(upto) or (whole and not upto.startswith(before)):
        raise _not_prefix_stable(where, name)
    return start, len(upto)


def _check_tools_rendered(ex: Example, full: str, name: str, where: str) -> None:
    """A template that ignores tools would train tool calls as nothing: refuse it by name."""
    wanted = [("tool", t["function"]["name"]) for t in ex.tools or []]
    for m in ex.messages:
        wanted += [("tool call", c["function"]["name"]) for c in m.get("tool_calls", [])]
        if m["role"] == "tool" and m["content"].strip():
            wanted.append(("tool result", m["content"].strip()[:40]))
    # A template may write a string through `tojson`: its escaped form counts as rendered too.
    missing = next(((what, s) for what, s in wanted if s not in full and json.dumps(s)[1:-1] not in full), None)
    if missing:
        raise UserError(f"{where}: {name} does not render {missing[0]}s ({missing[1]!r} is missing); {FIX}")


def encode_chat(tokenizer: Any, ex: Example, stop_ids: set[int], where: str) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its mask: 1 on the tokens of assistant turns that carry loss."""
    from jinja2 import TemplateError

    if not tokenizer.chat_template:
        raise UserError(
            f"{where}: chat rows need a chat template, and the tokenizer of {tokenizer.name_or_path} has none; "
            "set data.chat_template (e.g. chatml)"
        )
    tpl, name = mask_template(tokenizer)
    loss = ex.loss or [m["role"] == "assistant" for m in ex.messages]  # default: every assistant turn
    try:
        full = _render(tokenizer, ex, len(ex.messages), tpl)
        if ex.tools or any(m.get("tool_calls") or m["role"] == "tool" for m in ex.messages):
            _check_tools_rendered(ex, full, name, where)
        if tpl is not None:
            out = tokenizer.apply_chat_template(
                ex.messages, chat_template=tpl, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                **({"tools": ex.tools} if ex.tools else {}),
            )
            ids, mask, offsets = list(out["input_ids"]), list(out["assistant_masks"]), out.encodings[0].offsets
            excluded = [
                _turn_span(tokenizer, ex, i, tpl, full, name, where, whole=True)
                for i, m in enumerate(ex.messages)
                if m["role"] == "assistant" and not loss[i]
            ]
            mask = [0 if any(s <= a < e for s, e in excluded) else k for k, (a, _) in zip(mask, offsets)]
        else:
            enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            ids = enc["input_ids"]
            spans = [
                _turn_span(tokenizer, ex, i, tpl, full, name, where)
                for i, m in enumerate(ex.messages)
                if m["role"] == "assistant" and loss[i]
            ]
            mask = [1 if any(s <= a < e for s, e in spans) else 0 for a, _ in enc["offset_mapping"]]
    except TemplateError as e:
        raise UserError(f"{where}: {name} cannot render this conversation ({e}); {FIX}") from None
    if not any(t in stop_ids for t, m in zip(ids, mask) if m):
        raise UserError(
            f"{where}: {name} ends assistant turns without the EOS token {tokenizer.eos_token!r}, so the model "
            "would never learn to stop; use data.chat_template: chatml or a model family"
        )
    return ids, mask
