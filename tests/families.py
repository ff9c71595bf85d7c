"""The family matrix: one tiny random model per architecture users bring, from transformers' own config classes.

Each is as small as its class allows (hidden 32, 2 layers, 4 experts of which 2 are active) so that the whole
matrix trains in seconds; the tokenizer is the embedded tiny model's (`tiny.build_tokenizer`), so every family
reads the same data the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 512}  # fmt: skip
_EXPERTS = {"num_experts_per_tok": 2}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma2": {}, "gemma3_text": {}, "phi3": {},
    "olmo2": {}, "granite": {}, "smollm3": {},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 512},
    "qwen3_moe": {**_EXPERTS, "num_experts": 4, "moe_intermediate_size": 32},
    # Qwen2-MoE's 1-wide shared-expert gate is the layer QLoRA must not quantize.
    "qwen2_moe": {**_EXPERTS, "num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32},
    "mixtral": {**_EXPERTS, "num_local_experts": 4},
    "gpt_oss": {**_EXPERTS, "num_local_experts": 4},
    "deepseek_v3": {**_EXPERTS, "n_routed_experts": 4, "num_key_value_heads": 4, "moe_intermediate_size": 32,
                    "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "kv_lora_rank": 16,
                    "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8},
}  # fmt: skip
MOE = ("qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss", "deepseek_v3")


def build_families(out: Path, tokenizer: Any, names: tuple[str, ...] = tuple(FAMILIES)) -> dict[str, Path]:
    """Write each family's tiny model with `tokenizer` under `out`; {family: model directory}."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    paths = {}
    for name in names:
        fields = FAMILIES[name] if name == "gpt2" else {**_SHAPE, **FAMILIES[name]}
        config = AutoConfig.for_model(name, vocab_size=len(tokenizer), **ids, **fields, dtype="float32")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config = GenerationConfig(**ids)
        paths[name] = out / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths
