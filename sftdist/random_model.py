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


def _config(fields: dict[str, Any], tokenizer: Any, name: str) -> Any:
    """The transformers config of `fields`, with the embedded tokenizer's special ids and vocabulary."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    fields = dict(fields)
    try:
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (ValueError, TypeError, KeyError, ArithmeticError, StrictDataclassError) as e:  # 0 heads: ZeroDivisionError
        raise UserError(f"config {name}: not a config transformers knows ({_first_line(e)})") from None
    text = config.get_text_config()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(text, key, getattr(tokenizer, key))
    text.vocab_size = max(text.vocab_size, len(tokenizer))
    return config


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__  # hub's validation errors put the reason last


def _build(config: Any, name: str, **kwargs: Any) -> Any:
    """The causal LM of `config` (on the current torch device); a config whose fields cannot build one is one line."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(config, **kwargs)
    except (ValueError, KeyError, TypeError, ArithmeticError, StrictDataclassError) as e:
        raise UserError(f"config {name}: cannot build a causal LM from it ({_first_line(e)})") from None


def write_config(size: str, out: Path) -> None:
    """Only the config.json that `ensure_model` would write, its model built on the meta device (which checks
    its fields): what the planner needs, before gigabytes of weights are written."""
    import torch

    from sftdist.tiny import build_tokenizer

    config = _config(_config_of(size)[1], build_tokenizer(0), out.name)
    with torch.device("meta"):
        _build(config, out.name)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)


def write_model(fields: dict[str, Any], out: Path, seed: int = 0) -> None:
    """Draw bf16 weights for the config `fields` and write them with the embedded tokenizer into `out`."""
    import torch
    from transformers import GenerationConfig

    from sftdist.tiny import build_tokenizer

    tokenizer = build_tokenizer(seed)
    config = _config(fields, tokenizer, out.name)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(context, int):
        tokenizer.model_max_length = context
    torch.manual_seed(seed)
    with torch.device("cpu"):  # never a GPU: see the module's docstring
        model = _build(config, out.name, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(**ids)
    with build_beside(out, replace=True) as tmp:
        model.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
    del model  # freed here, before the caller launches the training processes
