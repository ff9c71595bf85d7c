"""The embedded default model: a small random Llama with a BPE tokenizer trained here, offline.

The README's commands, the demo recipe and the test suite need a model without a hub. This one is
shaped like the models users fine-tune (Llama blocks, a byte-level BPE, a post-processor that
prepends BOS, a chat template with `{% generation %}` marks, a pad token distinct from EOS), so the
paths that matter for real models (no double BOS, EOS inside the loss, assistant-only masks) run in
every test that uses it. Its size (~1M parameters) is the smallest found to learn the demo tasks
reliably on a 2-core CPU in a few minutes (with 2 layers the list tasks were hit or miss). Building
it takes seconds and depends only on the seed and the committed demo data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from sftdist.errors import UserError
from sftdist.rundir import build_beside

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VOCAB_SIZE = 2048

MODEL_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}

# ChatML turns marked with added special tokens. An assistant turn ends with EOS (so generation stops
# by itself) and its reasoning, content, tool calls and EOS sit inside {% generation %}, so that
# `return_assistant_tokens_mask` marks exactly the tokens the model must learn to produce. Tools are
# listed as JSON in a `tools` turn, each call is a `<tool_call>` JSON block (as in Qwen), reasoning is
# a `<think>` block, and tool results are `tool` turns. Every turn renders the same whatever follows
# it, so the template is prefix-stable.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|im_start|>tools\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}"
    "{% if message.get('reasoning_content') %}{{ '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n' }}{% endif %}"
    "{{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>\\n' }}{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{ '\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ eos_token }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Files make_tiny_model writes: an existing directory holding only these may be replaced.
_OUTPUT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
}

# Common English words (written for this file), so that ordinary prompts tokenize into word pieces
# rather than bytes and stay short in tests that feed other data to the tiny model.
_COMMON_WORDS = (
    "the be to of and a in that have it for not on with he as you do at this but his by from they we "
    "say her she or an will my one all would there their what so up out if about who get which go me "
    "when make can like time no just him know take people into year your good some could them see "
    "other than then now look only come its over think also back after use two how our work first "
    "well way even new want because any these give day most us is are was were been has had did does "
    "write answer question list word words number numbers text story name city country water food "
    "music book school house world life hand part place case week system program problem fact "
    "explain describe summarize classify extract given following based information provide example "
    "why where many much more less long short small large big old young high low great little "
    "right left best better each every both few own same different important public able"
).split()


def _tokenizer_corpus(seed: int) -> list[str]:
    """Demo rows in the package's two renderings, plus generated sentences for generic English."""
    from sftdist.data.templates import PROMPT_TEMPLATES
    from sftdist.demo import TRAIN_PATH, WORDS

    template = PROMPT_TEMPLATES["default"]
    texts = []
    with open(TRAIN_PATH, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.append(template.render(row["instruction"], row["context"]) + row["response"])
            texts.append(
                f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n"
                f"{IM_START}user\n{row['instruction']}\n{row['context']}{IM_END}\n"
                f"{IM_START}assistant\n{row['response']}"
            )
    rng = random.Random(seed)
    vocabulary = _COMMON_WORDS + WORDS
    for _ in range(3000):
        words = rng.choices(vocabulary, k=rng.randint(4, 14))
        words[0] = words[0].capitalize()
        texts.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":", ";"]) + f" {rng.randint(0, 9999)}")
    texts.append("".join(chr(c) for c in range(32, 127)))
    return texts


def build_tokenizer(seed: int = 0) -> Any:
    """Train a byte-level BPE (every byte encodable, so no unknown token) and wrap it for transformers;
    also the tokenizer of `sftdist selftest`'s larger random models (random_model.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Single digits, as in Llama: a number the model never saw whole is still made of known tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def _check_replaceable(out: Path) -> None:
    """Refuse to delete a directory that holds anything this function did not write."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; expected a new or tiny-model directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _OUTPUT_FILES)
        if foreign:
            raise UserError(
                f"{out}: holds {', '.join(foreign[:3])}, which make-tiny-model did not write; "
                "expected a new directory or an earlier tiny model"
            )


def make_tiny_model(out_dir: str, seed: int = 0) -> None:
    """Write the tiny model + tokenizer to `out_dir` (replaced as a whole, never left half-written)."""
    out = Path(out_dir).resolve()
    _check_replaceable(out)

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **MODEL_SHAPE,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    with build_beside(out, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
