"""Read one data source as chunks of rows, whatever its container (step 1 of read -> render ->
encode -> pack -> cache).

A source is read in chunks of `CHUNK_ROWS` so that a source larger than memory never becomes one
Python list: jsonl is streamed line by line, and parquet/csv/Arrow are memory-mapped by `datasets`
and sliced. jsonl/json are parsed here rather than by `datasets`' json builder (gap filled: it
reports a bad line or non-UTF-8 bytes as a pyarrow traceback without the line number, and it
rejects rows whose types differ before we can say which row is wrong). A `.json` file is one
document, so it is parsed whole. A UTF-8 byte-order mark at the start (Windows tools write one) is
read as UTF-8.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sftdist import hub
from sftdist.data.formats import is_row
from sftdist.errors import UserError
from sftdist.recipe import SourceConfig

BOM = b"\xef\xbb\xbf"
# A JSON escape of a UTF-16 surrogate: valid in pairs, but one alone decodes to text that is not Unicode.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _check_unicode(row: Any, where: str) -> None:
    """A lone surrogate escape ("\\ud800" without its partner) parses, then fails the tokenizer deep in
    the data build; the row is named here instead (called only for text holding such an escape)."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(
            f"{where}: text holds a lone surrogate escape (a \\ud800-\\udfff without its pair), which is not valid "
            "Unicode; fix or remove the row"
        ) from None


@dataclass
class Rows:
    """The rows of one source, with how to name each in an error (`line 7`, `row 7`)."""

    where: str
    rows: list[dict[str, Any]]
    labels: list[str]


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 text file (a leading byte-order mark dropped), or
    a one-line error naming the first line that is not UTF-8."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.removeprefix(BOM).decode("utf-8") if n == 1 else raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {n}: bytes that are not UTF-8 at column {e.start + 1}") from None
            yield n, line


def _iter_jsonl(path: Path, chunk_rows: int) -> Iterator[Rows]:
    rows: list[dict[str, Any]] = []
    labels: list[str] = []
    for n, line in read_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
        if _SURROGATE_ESCAPE.search(line):
            _check_unicode(obj, f"{path} line {n}")
        rows.append(obj)
        labels.append(f"line {n}")
        if len(rows) == chunk_rows:
            yield Rows(str(path), rows, labels)
            rows, labels = [], []
    if rows:
        yield Rows(str(path), rows, labels)


def _read_json(path: Path) -> Rows:
    data = path.read_bytes().removeprefix(BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path} line {line}: bytes that are not UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.pos > 0 and text.lstrip().startswith("{") and "\n" in text.strip():
            return _merge(list(_iter_jsonl(path, 1 << 62)), str(path))  # a .json file holding JSON lines
        raise UserError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict):  # one row (a conversation, a record), or a wrapper {"data": [rows]}
        lists = [v for v in obj.values() if isinstance(v, list)]
        obj = lists[0] if len(obj) == 1 and lists and not is_row(obj) else [obj]
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a JSON list of objects, got {type(obj).__name__}")
    escapes = _SURROGATE_ESCAPE.search(text) is not None
    for i, row in enumerate(obj, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{path} row {i}: expected a JSON object, got {type(row).__name__}")
        if escapes:
            _check_unicode(row, f"{path} row {i}")
    return Rows(str(path), obj, [f"row {i}" for i in range(1, len(obj) + 1)])


def _iter_with_datasets(src: SourceConfig, path: Path, chunk_rows: int) -> Iterator[Rows]:
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
            hub.unreachable()  # settled before datasets asks the hub (it would retry for ~26 s)
            ds = datasets.load_dataset(src.path, split=src.split)
    except UserError:
        raise
    except FileNotFoundError as e:
        raise UserError(f"{src.path}: not a data file or Arrow directory ({e})") from None
    except (ValueError, ConnectionError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = None if path.exists() else hub.offline_error(src.path, "the data set")
        raise offline or UserError(f"{src.path}: could not be read as a dataset ({first})") from None
    where = str(path if path.exists() else src.path)
    for start in range(0, len(ds), chunk_rows):
        batch = ds[start : start + chunk_rows]  # columns of one slice of the memory-mapped table
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        yield Rows(where, rows, [f"row {i}" for i in range(start + 1, start + len(rows) + 1)])


SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")
CHUNK_ROWS = 10_000


def _merge(chunks: list[Rows], where: str) -> Rows:
    return Rows(where, [r for c in chunks for r in c.rows], [label for c in chunks for label in c.labels])


def _chunks(src: SourceConfig, chunk_rows: int) -> Iterator[Rows]:
    path = Path(src.path).expanduser()
    if path.is_file():
        if path.stat().st_size == 0:
            raise UserError(f"{path}: the file is empty")
        if path.suffix == ".jsonl":
            yield from _iter_jsonl(path, chunk_rows)
        elif path.suffix == ".json":
            yield _read_json(path)
        elif path.suffix in SUFFIXES:
            yield from _iter_with_datasets(src, path, chunk_rows)
        else:
            raise UserError(f"{path}: unknown data file type '{path.suffix}'; expected one of {', '.join(SUFFIXES)}")
    elif path.is_dir() or hub.looks_like_hub_id(src.path):
        yield from _iter_with_datasets(src, path, chunk_rows)
    else:
        raise UserError(f"{src.path}: data path does not exist")


def iter_source(src: SourceConfig, chunk_rows: int | None = None) -> Iterator[Rows]:
    """The rows of one source (after `limit`) in chunks of at most `chunk_rows` (default
    `CHUNK_ROWS`), or a one-line error naming the file; a source without rows is an error."""
    left = src.limit
    seen = False
    for chunk in _chunks(src, chunk_rows or CHUNK_ROWS):
        if left is not None:
            chunk.rows, chunk.labels = chunk.rows[:left], chunk.labels[:left]
            left -= len(chunk.rows)
        if chunk.rows:
            seen = True
            yield chunk
        if left is not None and left <= 0:
            break
    if not seen:
        raise UserError(f"{Path(src.path).expanduser()}: no rows (the file holds no data)")


def read_source(src: SourceConfig) -> Rows:
    """All rows of one source at once: for small inputs (prompt files, `--show`), not for training data."""
    chunks = list(iter_source(src))
    return _merge(chunks, chunks[0].where)
