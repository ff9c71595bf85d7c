"""`sftdist export CHECKPOINT --out DIR`: any checkpoint -> a Hugging Face model directory.

The weights come from the most exact source the checkpoint holds: ZeRO shards are consolidated with
deepspeed's `zero_to_fp32` (the fp32 master weights), FSDP2 `SHARDED_STATE_DICT` shards with torch's
distributed-checkpoint reader (what `accelerate merge-weights` does), otherwise the saved safetensors.
The output is sharded safetensors with an index, the config, the tokenizer and chat template, and a
generation config whose EOS is the tokenizer's. A LoRA checkpoint exports its adapter (from the
adapter file, or from FSDP2 shards, which hold only the adapter), or with `--merge` the merged model.
It is built beside `--out` and renamed at the end, with the run's recipe and prompt style, so that
`sftdist generate` renders prompts for it as training did.

Before anything is written, the checkpoint is checked: its manifest (a checkpoint sftdist wrote),
its config, and its safetensors files; files that vanish while it is read (a running training
rotating the checkpoint away) are one line, not a traceback.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftdist import rundir
from sftdist.errors import UserError
from sftdist.rundir import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINT_RE, COMPLETE_MARKER, FSDP_SHARDS, MANIFEST, TRAINER_STATE,
)  # fmt: skip


def checkpoint_kind(ckpt: Path) -> str:
    """'adapter', 'fsdp-adapter', 'zero', 'fsdp' or 'full', from what the directory holds.

    A LoRA checkpoint is an adapter whatever the strategy: under ZeRO its global_step* shards hold
    the frozen base too, but the adapter file beside them is the whole trained state."""
    if (ckpt / ADAPTER_CONFIG).is_file():
        if (ckpt / ADAPTER_WEIGHTS).is_file():
            return "adapter"
        if (ckpt / FSDP_SHARDS).is_dir():
            return "fsdp-adapter"
    elif any(ckpt.glob("global_step*")):
        return "zero"
    elif (ckpt / FSDP_SHARDS).is_dir():
        return "fsdp"
    elif any(ckpt.glob("model*.safetensors")):
        return "full"
    raise UserError(f"{ckpt}: holds no model weights (no safetensors, ZeRO or FSDP shards)")


def check_checkpoint(ckpt: Path) -> str:
    """Everything export reads, checked before it writes; returns the checkpoint's kind. A checkpoint
    sftdist wrote must still hold what its manifest lists (a file cut short or lost since is refused);
    any directory's config must parse and its safetensors files must be whole."""
    from sftdist import safetensors_io as sio
    from sftdist.merge import read_adapter_config
    from sftdist.model import read_config

    if not ckpt.is_dir():
        raise UserError(f"{ckpt}: checkpoint directory does not exist")
    marked = (ckpt / COMPLETE_MARKER).is_file()
    if CHECKPOINT_RE.match(ckpt.name) and not marked:
        raise UserError(f"{ckpt}: checkpoint is incomplete (no {COMPLETE_MARKER} marker; the run stopped mid-write)")
    if (ckpt / MANIFEST).is_file():  # one written before manifests existed is vouched for by its marker alone
        problem = rundir.check_manifest(ckpt)
        if problem is not None:
            raise UserError(f"{ckpt}: checkpoint is damaged ({problem}); export another checkpoint")
    if not (ckpt / "config.json").is_file() and not (ckpt / ADAPTER_CONFIG).is_file():
        raise UserError(f"{ckpt}: no config.json or {ADAPTER_CONFIG}, so it is not a model checkpoint")
    kind = checkpoint_kind(ckpt)
    if kind in ("adapter", "fsdp-adapter"):
        read_adapter_config(ckpt)
    else:
        read_config(str(ckpt))
    for f in sorted(ckpt.glob("*.safetensors")):
        sio.tensor_specs(f)
    if kind == "full":
        weight_files(ckpt)
    return kind


def weight_files(ckpt: Path) -> list[Path]:
    """The weight files of a full-model checkpoint, as its index names them (or its one model.safetensors).
    Any other model*.safetensors beside them (a stray copy of the base, an older save) is refused rather
    than read: exported in place of the trained weights, it would go unnoticed."""
    from sftdist import safetensors_io as sio

    files = sio.model_shards(ckpt)
    stray = sorted(p.name for p in ckpt.glob("model*.safetensors") if p not in files)
    if stray:
        named = f"named by {sio.INDEX_FILE}" if (ckpt / sio.INDEX_FILE).is_file() else f"{sio.SINGLE_FILE}"
        raise UserError(f"{ckpt}: holds {stray[0]}, which is not one of its weight files ({named}); move it away, "
                        "or export another checkpoint")
    return files


def check_finite(where: Path, state: dict[str, Any]) -> None:
    """No NaN or infinity is exported: such weights come from a run that diverged."""
    import torch

    for name, tensor in state.items():
        t = tensor.float() if tensor.is_floating_point() and tensor.element_size() == 1 else tensor  # fp8
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{where}: weight {name} holds NaN or infinite values (the run diverged before this "
                            "checkpoint was saved); export an earlier checkpoint")


@contextlib.contextmanager
def _vanishing_is_user_error(ckpt: Path) -> Iterator[None]:
    """A checkpoint deleted while export reads it (a running training rotates old checkpoints away)
    fails wherever the reader happens to be; when files it held are gone, one line says so instead."""
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    try:
        yield
    except Exception:
        gone = [p for p in files if not p.exists()]
        if not gone:
            raise
        raise UserError(
            f"{ckpt}: {len(gone)} of its files vanished while exporting (e.g. {gone[0].relative_to(ckpt)}); a running "
            "training may have rotated this checkpoint away (train.save_total_limit): export a newer one, or copy it first"
        ) from None


def consolidated_state_dict(ckpt: Path, kind: str) -> dict[str, Any]:
    """Whole, unsharded weights of a full-model checkpoint, or of an FSDP2 LoRA one (whose shards hold the adapter only)."""
    if kind == "zero":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    if kind in ("fsdp", "fsdp-adapter"):
        import torch.distributed.checkpoint as dcp

        # torch's own DCP -> torch.save converter (`dcp_to_torch_save`) is built on these two; it writes a
        # pickle file, where we want the state dict in memory, so its parts are called directly.
        from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner, _load_state_dict

        state: dict[str, Any] = {}
        _load_state_dict(
            state,
            storage_reader=dcp.FileSystemReader(str(ckpt / FSDP_SHARDS)),
            planner=_EmptyStateDictLoadPlanner(),
            no_dist=True,
        )
        return state["model"] if list(state) == ["model"] else state
    from safetensors.torch import load_file

    state = {}
    for f in weight_files(ckpt):
        state.update(load_file(str(f)))
    return state


def _write_adapter(ckpt: Path, kind: str, dst: Path) -> None:
    """The adapter as peft saves it, plus the run's files and trainer state (merge-adapter reads them:
    a QLoRA adapter is merged into the 4-bit base it was trained against)."""
    from safetensors.torch import save_file

    if kind == "adapter":
        from safetensors.torch import load_file

        check_finite(ckpt, load_file(str(ckpt / ADAPTER_WEIGHTS)))
        shutil.copy2(ckpt / ADAPTER_WEIGHTS, dst / ADAPTER_WEIGHTS)
    else:
        state = consolidated_state_dict(ckpt, kind)
        check_finite(ckpt, state)
        save_file({k: v.contiguous() for k, v in state.items()}, str(dst / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    shutil.copy2(ckpt / ADAPTER_CONFIG, dst / ADAPTER_CONFIG)
    state_file = rundir.run_file(ckpt, TRAINER_STATE)
    if state_file is not None:
        shutil.copy2(state_file, dst / TRAINER_STATE)
    rundir.copy_run_files(ckpt, dst)
    rundir.copy_tokenizer(ckpt, dst)


def _write_full_model(ckpt: Path, kind: str, tmp: Path, max_shard_size: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from sftdist.model import model_class

    config = AutoConfig.from_pretrained(ckpt)
    state = consolidated_state_dict(ckpt, kind)
    check_finite(ckpt, state)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    for name, tensor in state.items():  # names in another layout (MoE experts on disk) are converted below
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise UserError(
                f"{ckpt}: weight {name} has shape {tuple(tensor.shape)}, but config.json gives "
                f"{expected[name]}; the weights and config.json are of different models"
            )
    # transformers' own loading, which converts the hub's on-disk layout (save_pretrained writes MoE experts one
    # by one) into the in-memory one (fused experts) with its conversion mapping; ZeRO/FSDP shards hold the
    # in-memory names, which pass through. The weights keep their dtype (ZeRO's are the fp32 masters).
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    model, info = model_class(config).from_pretrained(None, config=config, state_dict=state, dtype=dtype, output_loading_info=True)
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if missing or unexpected:
        raise UserError(f"{ckpt}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tok = AutoTokenizer.from_pretrained(ckpt)
    gen = GenerationConfig.from_pretrained(ckpt) if (ckpt / rundir.GENERATION_CONFIG).is_file() else GenerationConfig()
    gen.eos_token_id = tok.eos_token_id
    gen.pad_token_id = tok.pad_token_id
    model.generation_config = gen
    model.to(getattr(torch, export_dtype(ckpt)))  # the dtype final/ has (save_dtype.py), not the shards' fp32
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    tok.save_pretrained(tmp)
    rundir.copy_run_files(ckpt, tmp)


def export_dtype(ckpt: Path) -> str:
    """The dtype final/ of the checkpoint's run has: its recipe's save_dtype, else the base model's own dtype (when
    its config.json can be read here), else bf16 on a GPU machine and fp32 on CPU."""
    import yaml

    from sftdist import save_dtype
    from sftdist.model import has_cuda, read_config

    path = rundir.run_file(ckpt, rundir.RECIPE_FILE)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) if path is not None else None
    raw = raw if isinstance(raw, dict) else {}
    wanted = raw.get("save_dtype", "auto")
    base = (raw.get("model") or {}).get("name_or_path")
    config = None
    if wanted == "auto" and isinstance(base, str) and base:
        with contextlib.suppress(UserError):  # a base no longer at hand: the fallback below
            config = read_config(base)
    return save_dtype.resolve(wanted, config, has_cuda(), f"{path}: save_dtype")


def export_checkpoint(checkpoint: str, out: str, merge: bool, max_shard_size: str) -> Path:
    """Write `out` from `checkpoint`; nothing is left in `out` if anything fails."""
    ckpt, out_path = Path(checkpoint), Path(out)
    with _vanishing_is_user_error(ckpt):
        kind = check_checkpoint(ckpt)
    rundir.check_new_dir(out_path, "--out")
    if merge and kind not in ("adapter", "fsdp-adapter"):
        raise UserError(f"{ckpt}: --merge needs a LoRA/QLoRA checkpoint, but this one holds a full model")
    if merge:  # the adapter in a scratch directory, then merge-adapter builds --out (beside it, verified)
        from sftdist.merge import merge_adapter, read_adapter_config

        base = read_adapter_config(ckpt).get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise UserError(
                f"{ckpt / ADAPTER_CONFIG}: names no base_model_name_or_path to merge into; use sftdist merge-adapter --base"
            )
        # In the system's temporary directory, not beside --out: a killed export leaves nothing there.
        with tempfile.TemporaryDirectory(prefix="sftdist-export-adapter-") as scratch:
            with _vanishing_is_user_error(ckpt):
                _write_adapter(ckpt, kind, Path(scratch))
            merge_adapter(base, scratch, str(out_path), max_shard_size=max_shard_size)
        return out_path
    with _vanishing_is_user_error(ckpt), rundir.build_beside(out_path) as tmp:
        if kind in ("adapter", "fsdp-adapter"):
            _write_adapter(ckpt, kind, tmp)
        else:
            _write_full_model(ckpt, kind, tmp, max_shard_size)
    return out_path
