"""Read one data source into a list of rows, whatever its container.

jsonl/json are parsed here, line by line, rather than by `datasets`' json builder (gap filled: it
reports a bad line or non-UTF-8 bytes as a pyarrow traceback without the line number, and it
rejects rows whose types differ before we can say which row is wrong). parquet, csv, Arrow
directories (`save_to_disk`) and hub ids go through `datasets`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftdist.errors import UserError
from sftdist.recipe import SourceConfig


@dataclass
class Rows:
    """The rows of one source, with how to name each in an error (`line 7`, `row 7`)."""

    where: str
    rows: list[dict[str, Any]]
    labels: list[str]


def _read_jsonl(path: Path) -> Rows:
    rows, labels = [], []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {n}: bytes that are not UTF-8 at column {e.start + 1}") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
            rows.append(obj)
            labels.append(f"line {n}")
    return Rows(str(path), rows, labels)


def _read_json(path: Path) -> Rows:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{path} line {line}: bytes that are not UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.pos > 0 and text.lstrip().startswith("{") and "\n" in text.strip():
            return _read_jsonl(path)  # a .json file holding JSON lines
        raise UserError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict):  # {"data": [...]} or a single column-oriented mapping
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(obj) == 1 and lists:
            obj = lists[0]
        else:
            obj = [obj]
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a JSON list of objects, got {type(obj).__name__}")
    for i, row in enumerate(obj, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{path} row {i}: expected a JSON object, got {type(row).__name__}")
    return Rows(str(path), obj, [f"row {i}" for i in range(1, len(obj) + 1)])


def _read_with_datasets(src: SourceConfig, path: Path) -> Rows:
    import datasets

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise UserError(f"{path}: no split '{src.split}'; it has {', '.join(ds)}")
                ds = ds[src.split]
        elif path.exists():
            builder = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}[path.suffix]
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(src.path, split=src.split)
    except UserError:
        raise
    except FileNotFoundError as e:
        raise UserError(f"{src.path}: not a data file or Arrow directory ({e})") from None
    except (ValueError, ConnectionError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{src.path}: could not be read as a dataset ({first})") from None
    rows = ds.to_list()
    return Rows(str(path if path.exists() else src.path), rows, [f"row {i}" for i in range(1, len(rows) + 1)])


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and "." not in parts[0]


SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")


def read_source(src: SourceConfig) -> Rows:
    """All rows of one source (after `limit`), or a one-line error naming the file."""
    path = Path(src.path).expanduser()
    if path.is_file():
        if path.stat().st_size == 0:
            raise UserError(f"{path}: the file is empty")
        if path.suffix == ".jsonl":
            rows = _read_jsonl(path)
        elif path.suffix == ".json":
            rows = _read_json(path)
        elif path.suffix in SUFFIXES:
            rows = _read_with_datasets(src, path)
        else:
            raise UserError(f"{path}: unknown data file type '{path.suffix}'; expected one of {', '.join(SUFFIXES)}")
    elif path.is_dir():
        rows = _read_with_datasets(src, path)
    elif _looks_like_hub_id(src.path):
        rows = _read_with_datasets(src, path)
    else:
        raise UserError(f"{src.path}: data path does not exist")
    if not rows.rows:
        raise UserError(f"{rows.where}: no rows (the file holds no data)")
    if src.limit is not None:
        rows.rows, rows.labels = rows.rows[: src.limit], rows.labels[: src.limit]
    return rows


def apply_weight(items: list[Any], weight: float, seed: int) -> list[Any]:
    """Mix by weight: 0.5 keeps a random half of the source, 2.0 repeats it twice, 1.5 once and a half."""
    rng = random.Random(seed)
    whole, frac = int(weight), weight - int(weight)
    out = items * whole
    if frac > 0:
        out += rng.sample(items, round(frac * len(items)))
    return out
