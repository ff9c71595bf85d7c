"""Sharded safetensors, one tensor at a time: list a model's shards, read them, write re-sharded output.

Gap filled: transformers and peft load or save a whole state dict at once; streaming a model
through a transformation (merge-adapter) needs shard-level reading and a writer that lays out
shards and the `model.safetensors.index.json` the way `save_pretrained` does.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftdist.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",  # fp8 checkpoints (e.g. DeepSeek-V3, fp8 exports)
}
DTYPE_CODES = {v: k for k, v in DTYPE_NAMES.items()}
DTYPE_SIZES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
               "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{index}: not a readable shard index (expected a JSON object with a weight_map)") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise UserError(f"{index}: lists shard {missing[0]}, which is not in {index.parent}")
    return [index.parent / f for f in files]


def model_shards(model_dir: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a model directory (sorted by name); pickle (.bin) files only when allowed."""
    if (model_dir / INDEX_FILE).is_file():
        return _shards_from_index(model_dir / INDEX_FILE)
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    pickles = [model_dir / PICKLE_INDEX, model_dir / PICKLE_SINGLE]
    if any(p.is_file() for p in pickles):
        if not allow_pickle:
            raise UserError(
                f"{model_dir}: holds only pickle weights (.bin), which can run code when loaded; "
                "convert them to safetensors or pass --allow-pickle if you trust them"
            )
        return _shards_from_index(pickles[0]) if pickles[0].is_file() else [pickles[1]]
    raise UserError(f"{model_dir}: no model weights found (expected {SINGLE_FILE} or {INDEX_FILE})")


def tensor_specs(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, torch dtype name) of every tensor in a weight file, without reading the data."""
    if path.suffix == ".bin":
        return {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in shard_tensors(path)}
    with _open(path) as f:
        slices = {k: f.get_slice(k) for k in f.keys()}
        return {k: (tuple(s.get_shape()), DTYPE_NAMES.get(s.get_dtype(), s.get_dtype())) for k, s in slices.items()}


@contextlib.contextmanager
def _open(path: Path, **kwargs: Any) -> Iterator[Any]:
    """safetensors' reader, which checks the header and that the data covers the whole file; a file
    cut short (or not safetensors at all) is a one-line error naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(path, framework="pt", **kwargs)
    except SafetensorError as e:
        raise UserError(f"{path}: not a whole safetensors file ({e}); was it cut short?") from None
    with f:
        yield f


def shard_tensors(path: Path, names: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (name, tensor) from one shard, one tensor at a time (in `names` order when given)."""
    if path.suffix == ".bin":
        import torch

        # Only reached with --allow-pickle; weights_only refuses arbitrary objects, mmap keeps it lazy.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for name in names or list(state):
            yield name, state[name]
        return
    # pread instead of the default mmap: mapped pages would stay in RSS until the file closes.
    with _open(path, backend="pread") as f:
        for name in names or f.keys():
            yield name, f.get_tensor(name)


def load_tensors(path: Path) -> dict[str, Any]:
    """A whole (small) file, e.g. an adapter."""
    return dict(shard_tensors(path))


TensorInfo = tuple[str, tuple[int, ...], str]  # one tensor of a planned shard: name, shape, torch dtype name


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * DTYPE_SIZES[dtype]


def split_by_size(entries: list[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    """Cut a tensor sequence into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    groups: list[list[TensorInfo]] = [[]]
    size = 0
    for e in entries:
        n = nbytes(e[1], e[2])
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += n
    return [g for g in groups if g]


def _header(entries: list[TensorInfo]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        end = offset + nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Write planned shards one tensor at a time, so only the tensor in hand is in memory.

    Gap filled: safetensors' `save_file` takes a whole shard as a dict and first copies every tensor
    to bytes, which holds two copies of a shard. The layout (names, shapes, dtypes per shard) is known
    before the data, so each shard's header is written first and the tensors are appended as they come.
    """

    def __init__(self, out_dir: Path, groups: list[list[TensorInfo]]) -> None:
        self.out_dir = out_dir
        self.groups = groups
        n = len(groups)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        self._queue = iter([(g, i) for g, group in enumerate(groups) for i in range(len(group))])
        self._file: Any = None

    def write(self, name: str, tensor: Any) -> None:
        import torch

        g, i = next(self._queue)
        want = self.groups[g][i]
        got = (name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        if got != want:
            raise RuntimeError(f"shard writer expected {want}, got {got}")
        if i == 0:
            self._file = open(self.out_dir / self.files[g], "wb")
            self._file.write(_header(self.groups[g]))
        self._file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        if i == len(self.groups[g]) - 1:
            self._file.close()

    def close(self) -> None:
        """Close a shard left half-written by an error (the caller discards the directory)."""
        if self._file is not None:
            self._file.close()

    def finish(self) -> list[str]:
        """Check every planned tensor came, write the index when there are several shards; return the file names."""
        if next(self._queue, None) is not None:
            raise RuntimeError("shard writer finished before every planned tensor was written")
        if len(self.files) > 1:
            weight_map = {name: f for f, group in zip(self.files, self.groups) for name, _, _ in group}
            total = sum(nbytes(shape, dtype) for group in self.groups for _, shape, dtype in group)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return self.files
