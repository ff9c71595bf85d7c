"""Rendered examples -> `input_ids` + `completion_mask`, the pre-tokenized form trl packs and masks.

Gap filled: trl builds completion masks only for prompt/completion rows and assistant masks only
for chat templates that carry `{% generation %}` markers (most do not). Here a token carries loss
if it lies in the completion (instruction rows), in the whole text (text rows), or in an assistant
turn that carries loss (chat rows; data/chat.py finds those turns: `{% generation %}` markers, then
trl's training template of the model family, then rendering the conversation prefix by prefix).
Every sample must end its loss region with a stop token (EOS), and BOS appears at most once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sftdist.data.chat import encode_chat
from sftdist.data.formats import Example
from sftdist.errors import UserError


@dataclass
class Encoded:
    """Token ids and loss masks of kept examples, the examples dropped for length (by reason), and
    how many kept ones were cut at max_length; each example is counted once."""

    input_ids: list[list[int]] = field(default_factory=list)
    completion_mask: list[list[int]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """Token ids that end a generation: the tokenizer's EOS plus the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(eos)
    return ids


def _bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] if the tokenizer adds one on its own (Llama), else [] (GPT-2)."""
    bos = tokenizer.bos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and probe and probe[0] == bos else []


class Encoder:
    """Tokenizes examples the same way for training, `sftdist data` and generation prompts."""

    def __init__(self, tokenizer: Any, max_length: int, loss_on: str, truncate: bool, stop_ids: set[int]) -> None:
        self.tok = tokenizer
        self.max_length = max_length
        self.loss_on = loss_on
        self.truncate = truncate
        self.stop_ids = stop_ids
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise UserError("the tokenizer has no EOS token; a model trained without one never learns to stop")
        self.bos_prefix = _bos_prefix(tokenizer)
        # Why an example is dropped (or changed) for its length, as the reports word it.
        self.too_long = f"longer than max_length {max_length}"
        self.no_loss_left = f"no loss-carrying token within max_length {max_length}"
        self.cut = f"truncated to max_length {max_length}"

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.bos_prefix and ids[:1] == self.bos_prefix:
            return ids  # the text already starts with BOS: never two
        return self.bos_prefix + ids

    def prompt_ids(self, prompt: str) -> list[int]:
        """Ids of an instruction prompt, exactly as they start a training sample (for generation)."""
        return self._with_bos(self._batch([prompt])[0])

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Ids of a conversation followed by the assistant generation prompt (for generation)."""
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_one(self, ex: Example, where: str) -> tuple[list[int], list[int] | None]:
        """One example's ids and mask, before `fit` (see `_encode`)."""
        head = self._batch([ex.text or ex.prompt])[0] if ex.kind != "chat" else []
        tail = self._batch([ex.completion])[0] if ex.kind == "instruction" else []
        return self._encode(ex, where, head, tail)

    def _encode(self, ex: Example, where: str, head: list[int], tail: list[int]) -> tuple[list[int], list[int] | None]:
        """One sample from its tokenized text (or prompt) and completion; chat rows render here, their
        mask computed only as far as `fit` keeps tokens (None: it will drop them)."""
        if ex.kind == "chat":
            ids, mask = encode_chat(self.tok, ex, self.stop_ids, where, self.max_length, self.truncate)
            if mask is None:
                return ids, None
        elif ex.kind == "text":
            ids = self._with_bos(head) + [self.eos]
            mask = [1] * len(ids)
        else:
            head, tail = self._with_bos(head), tail + [self.eos]
            ids, mask = head + tail, [0] * len(head) + [1] * len(tail)
        if self.loss_on == "all":
            mask = [1] * len(ids)
        return ids, mask

    def fit(self, ids: list[int], mask: list[int] | None) -> tuple[list[int], list[int], str | None]:
        """A sample as training sees it, and what happened to it: None (kept whole), `self.cut`, or
        the reason it is dropped (`self.too_long`, or `self.no_loss_left` when the cut leaves no
        token to learn)."""
        if len(ids) <= self.max_length and mask is not None:
            return ids, mask, None
        if not self.truncate or mask is None:
            return ids, [], self.too_long
        ids, mask = ids[: self.max_length], mask[: self.max_length]
        return ids, mask, self.cut if any(mask) else self.no_loss_left

    def _batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []

    def encode(self, examples: list[Example], where: str, labels: list[str] | None = None) -> Encoded:
        """Encode one chunk of a source's examples; over-long ones are dropped (or truncated when asked).

        Gap filled: trl tokenizes one row at a time inside `datasets.map`. Instruction and text rows
        are tokenized here in two batched calls of the fast tokenizer (its Rust threads), which gives
        the same ids as `encode_one`; chat rows go through the chat template one by one. `labels`
        name each example's row in errors ("line 7"), so a message points into the file.
        """
        labels = labels or [f"example {i}" for i in range(1, len(examples) + 1)]
        plain = [i for i, ex in enumerate(examples) if ex.kind != "chat"]
        tails_at = [i for i in plain if examples[i].kind == "instruction"]
        head_of = dict(zip(plain, self._batch([examples[i].text or examples[i].prompt for i in plain])))
        tails = dict(zip(tails_at, self._batch([examples[i].completion for i in tails_at])))
        out = Encoded()
        for i, ex in enumerate(examples):
            encoded = self._encode(ex, f"{where} {labels[i]}", head_of.get(i, []), tails.get(i, []))
            ids, mask, outcome = self.fit(*encoded)
            if outcome in (self.too_long, self.no_loss_left):
                out.dropped[outcome] += 1
                continue
            out.truncated += outcome == self.cut
            out.input_ids.append(ids)
            out.completion_mask.append(mask)
        return out
