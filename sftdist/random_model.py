"""Random-weight models of published shapes, written as real model directories for `sftdist selftest`.

The selftest loads its model through the path training uses (`model.load_model`: from_pretrained with
the recipe's dtype, attention and 4-bit quantization), so the weights lie on disk like a downloaded
checkpoint's: safetensors shards in bf16 (as published), config.json and a tokenizer. The tokenizer is
the embedded one (`tiny.build_tokenizer`); its ~2k tokens are a subset of the model's vocabulary, so
the embedding and output layer keep their published size and cost. Weights are drawn on the CPU and
freed before any training process starts: the selftest's own process stays alive as the launcher for
the whole run, and weights drawn on a GPU would keep its memory (16 GB for 8B) reserved on rank 0's
device. Drawing and writing them (16 GB for 8B) takes time once per `--work` folder: a directory is
named after its config and reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sftdist.errors import UserError
from sftdist.rundir import build_beside

_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-5}
# The shapes of published Llama-layout models (their config.json, without rope scaling, which costs nothing).
SHAPES: dict[str, dict[str, Any]] = {
    "125m": {**_LLAMA, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,  # SmolLM2-135M
             "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
             "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True},
    "1b": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,  # Llama-3.2-1B
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
           "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True},
    "8b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,  # Llama-3.1-8B
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
           "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False},
}  # fmt: skip
SIZES = ("tiny", *SHAPES)  # tiny: the embedded default model (tiny.make_tiny_model)


def _config_of(size: str) -> tuple[str, dict[str, Any]]:
    """(a name for the directory, the config.json fields) of a size name or a config.json path."""
    if size in SHAPES:
        return size, SHAPES[size]
    path = Path(size)
    if path.suffix != ".json":
        raise UserError(f"--size {size}: expected one of {', '.join(SIZES)} or the path of a config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--size {size}: file not found") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--size {size}: not a readable JSON file ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise UserError(f"--size {size}: a config.json needs a 'model_type' (e.g. \"llama\")")
    return path.parent.name or "config", raw


def model_path(size: str, models: Path) -> Path:
    """Where the random model of `size` lives under `models`: named after its config, so a changed config is a new model."""
    if size == "tiny":
        return models / "tiny"
    name, fields = _config_of(size)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return models / f"{name}-{digest}"


def ensure_model(size: str, out: Path, seed: int = 0) -> None:
    """Write the random model of `size` into `out` unless it is there (build_beside renames a directory into
    place whole, so a config.json means a complete model)."""
    if (out / "config.json").is_file():
        return
    if size == "tiny":
        from sftdist.tiny import make_tiny_model

        make_tiny_model(str(out), seed=seed)
    else:
        write_model(_config_of(size)[1], out, seed)


def write_model(fields: dict[str, Any], out: Path, seed: int = 0) -> None:
    """Draw bf16 weights for the config `fields` and write them with the embedded tokenizer into `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from sftdist.tiny import build_tokenizer

    tokenizer = build_tokenizer(seed)
    fields = dict(fields)
    try:
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"config {out.name}: not a config transformers knows ({str(e).splitlines()[0]})") from None
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    text = config.get_text_config()
    for key, value in ids.items():
        setattr(text, key, value)
    text.vocab_size = max(text.vocab_size, len(tokenizer))
    context = getattr(text, "max_position_embeddings", None)
    if isinstance(context, int):
        tokenizer.model_max_length = context
    torch.manual_seed(seed)
    try:
        with torch.device("cpu"):  # never a GPU: see the module's docstring
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    except (ValueError, KeyError) as e:
        raise UserError(f"config {out.name}: cannot build a causal LM from it ({str(e).splitlines()[0]})") from None
    model.generation_config = GenerationConfig(**ids)
    with build_beside(out, replace=True) as tmp:
        model.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
    del model  # freed here, before the caller launches the training processes
