"""Named prompt templates (instruction formats) and the names `data.chat_template` accepts.

The `default` prompt template is the one of the guide this project grew from; the Context block
appears only when there is context. Chat formats use the tokenizer's own chat template (`auto`); a
tokenizer without one (GPT-2) must be given `chatml`, a model family whose training template trl
ships (`qwen3`, `llama3`, ...; see `training_families`) or a .jinja file in `data.chat_template`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PromptTemplate:
    """How an instruction (+ optional context) becomes the prompt; the response follows it verbatim."""

    with_context: str
    without_context: str

    def render(self, instruction: str, context: str = "") -> str:
        if context.strip():
            return self.with_context.format(instruction=instruction.strip(), context=context.strip())
        return self.without_context.format(instruction=instruction.strip())


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    "default": PromptTemplate(
        with_context="### Instruction:\n{instruction}\n\n### Context:\n{context}\n\n### Response:\n",
        without_context="### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "alpaca": PromptTemplate(
        with_context=(
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
        ),
        without_context=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    ),
}

# ChatML written with plain-text markers, so it works with any tokenizer (no special tokens needed);
# each assistant turn ends with the tokenizer's EOS, which therefore carries loss and stops generation.
CHATML_TEXT = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {"chatml": CHATML_TEXT}


def training_families() -> tuple[str, ...]:
    """Model families whose training chat template (with `{% generation %}` markers) trl ships.

    Read from trl's `chat_templates/*_training.jinja` file names without importing trl, so that a
    recipe is checked instantly.
    """
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return ()
    folder = Path(next(iter(spec.submodule_search_locations))) / "chat_templates"
    return tuple(sorted(p.name[: -len("_training.jinja")] for p in folder.glob("*_training.jinja")))


def training_template(family: str) -> str:
    """trl's training chat template of a model family (one of `training_families()`)."""
    import trl.chat_template_utils as ctu

    return getattr(ctu, f"{family}_training_chat_template")
