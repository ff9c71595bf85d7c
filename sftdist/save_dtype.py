"""The one dtype of a full model that sftdist writes: final/ of a full SFT run, and `sftdist export`.

Why: with `model.dtype: auto` full SFT trains fp32 weights, and what the final save wrote then depended on the
strategy: fp32 under single/DDP/FSDP2 (32 GB for 8B), bf16 under ZeRO-3 (`stage3_gather_16bit_weights_on_model_save`).
Here every strategy's final save and every export is cast, file by file, to one dtype: the recipe's `save_dtype`,
else the base model's own (its config.json `dtype`/`torch_dtype`: what it was published in), else bf16 when the run
trains on GPUs and fp32 on CPU (what CPU training has always written).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sftdist.errors import UserError

SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
_FLOAT_NAMES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}


def base_dtype(config: Any) -> str | None:
    """The float dtype a model's config says it was saved in (transformers 5 `dtype`, older `torch_dtype`), or None."""
    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None) if not isinstance(config, dict) else config.get(key)
        name = str(value).removeprefix("torch.") if value is not None else None
        if name in _FLOAT_NAMES:
            return _FLOAT_NAMES[name]
    return None


def resolve(save_dtype: str, config: Any, on_gpu: bool, where: str = "save_dtype") -> str:
    """The dtype to write: `save_dtype` unless it is auto, then the base's (`config`), then bf16 on GPUs, fp32 on CPU."""
    if save_dtype not in SAVE_DTYPES:
        raise UserError(f"{where}: {save_dtype!r} is not a dtype sftdist saves; expected one of {', '.join(SAVE_DTYPES)}")
    if save_dtype != "auto":
        return save_dtype
    return base_dtype(config) or ("bfloat16" if on_gpu else "float32")


def cast_model_dir(model_dir: Path, dtype: str) -> None:
    """Rewrite the float tensors of every safetensors file of `model_dir` in `dtype` (one file in memory at a time,
    each replaced atomically) and say so in its config.json; integer tensors and files already in `dtype` stay."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = getattr(torch, dtype)
    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as src:
            metadata = src.metadata()
            tensors = {k: src.get_tensor(k) for k in src.keys()}
        changed = False
        for k, t in tensors.items():
            if t.is_floating_point() and t.dtype != target:
                tensors[k], changed = t.to(target), True
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        if changed:
            tmp = f.with_name(f.name + ".cast")
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, f)
        del tensors
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        raw = json.loads(index.read_text(encoding="utf-8"))
        raw.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    config = model_dir / "config.json"
    if config.is_file():
        raw = json.loads(config.read_text(encoding="utf-8"))
        raw["dtype"] = dtype
        if "torch_dtype" in raw:
            raw["torch_dtype"] = dtype
        config.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
