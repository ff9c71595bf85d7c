"""Recipe `data:` -> the rows every rank trains on, built into one directory, plus a report.

The data path is one step per module: `load` (a source's rows, in chunks) -> `formats` (detect
and render) -> `encode` (token ids + loss mask, batched) -> here (labels, the report) -> `mix`
(eval split, then weights) -> `pack` (best-fit decreasing, once) -> `cache` (fingerprinted entry,
built once per job, memory-mapped by every rank). `sftdist prepare`, `train`, `data` and `data
--check` all go through `build`, so what the report says is what training sees, and the report's
counts give the same warnings (data/notices.py) on every run.

No step holds the data set as Python objects: each chunk of rows is encoded and appended to an
Arrow file at once, and mixing, splitting and packing work on Arrow tables and index arrays.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from sftdist.data.encode import Encoded, Encoder, stop_token_ids
from sftdist.data.formats import SELECT_FORMATS, render_rows
from sftdist.data.load import iter_source
from sftdist.data.mix import split_and_weight
from sftdist.data.notices import source_warnings
from sftdist import preemption
from sftdist.errors import UserError
from sftdist.recipe import Recipe, SourceConfig

REPORT_FILE = "report.json"
TRAIN_FILE = "train.arrow"
EVAL_FILE = "eval.arrow"


@dataclass
class SourceReport:
    """What happened to one source's rows (kept in the cache entry's report.json)."""

    where: str
    role: str  # "train" | "eval"
    format: str
    layout: str = ""  # the row layout its first chunk detected (messages, alpaca, ...), also under dpo_chosen/kto_good
    rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # rows, by reason
    changed: dict[str, int] = field(default_factory=dict)  # kept rows truncated, empty turns left out of the loss
    ignored_columns: list[str] = field(default_factory=list)
    ignored_keys: dict[str, int] = field(default_factory=dict)  # turn key -> turns holding it, unused
    kept: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    percentiles: dict[str, int] = field(default_factory=dict)  # p50 p90 p99 max of tokens per sample


@dataclass
class DataReport:
    """The whole data set as training sees it."""

    sources: list[SourceReport]
    train_samples: int
    eval_samples: int
    train_tokens: int
    train_loss_tokens: int
    packing: bool
    max_length: int
    train_rows: int  # rows the trainer iterates over: packed rows, or samples without packing

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> DataReport:
        raw = json.loads(text)
        raw["sources"] = [SourceReport(**s) for s in raw["sources"]]
        return cls(**raw)


def make_encoder(recipe: Recipe, tokenizer: Any) -> Encoder:
    d = recipe.data
    return Encoder(tokenizer, d.max_length, d.loss_on, d.truncate, stop_token_ids(tokenizer))


def warnings(report: SourceReport) -> list[str]:
    """A source's warning lines (data/notices.py), from its report: the same on every run."""
    return source_warnings(
        report.where, report.rows, report.dropped, report.changed, report.ignored_columns, report.ignored_keys
    )


def _table(enc: Encoded) -> tuple[Any, int]:
    """input_ids + labels (-100 where no loss) as an Arrow table, built from flat numpy arrays, and
    the number of tokens that carry loss."""
    import itertools

    import numpy as np
    import pyarrow as pa

    lengths = np.fromiter((len(x) for x in enc.input_ids), dtype=np.int64, count=len(enc.input_ids))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(enc.input_ids), dtype=np.int32, count=total)
    mask = np.fromiter(itertools.chain.from_iterable(enc.completion_mask), dtype=np.int8, count=total)
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    table = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
        }
    )
    return table, int(mask.sum())


def _percentiles(lengths: Any) -> dict[str, int]:
    import numpy as np

    if not len(lengths):
        return {}
    return {f"p{q}" if q < 100 else "max": int(np.percentile(lengths, q, method="nearest")) for q in (50, 90, 99, 100)}


@dataclass
class _Chunk:
    """What encoding one chunk of rows gives (small enough to come back from a worker process)."""

    where: str
    format: str
    rows: int
    dropped: Counter
    changed: Counter
    ignored_columns: list[str]
    ignored_keys: Counter
    table: Any  # pyarrow.Table, or None when nothing was kept
    loss_tokens: int
    lengths: Any  # numpy array of tokens per kept sample


def _encode_chunk(chunk: Any, fmt: str, recipe: Recipe, encoder: Encoder) -> _Chunk:
    import numpy as np

    rendered = render_rows(chunk.rows, chunk.labels, fmt, recipe.data.template, chunk.where)
    enc = encoder.encode(rendered.examples, chunk.where, rendered.labels)
    changed = rendered.changed + Counter({encoder.cut: enc.truncated})
    table, loss = _table(enc) if enc.input_ids else (None, 0)
    lengths = np.fromiter(map(len, enc.input_ids), dtype=np.int64, count=len(enc.input_ids))
    return _Chunk(
        chunk.where, rendered.format, len(chunk.rows), rendered.dropped + enc.dropped, changed,
        rendered.ignored_columns, rendered.ignored_keys, table, loss, lengths,
    )


_worker: dict[str, Any] = {}  # inherited by each worker process through fork (see _encoded_chunks)


def _encode_in_worker(chunk: Any) -> _Chunk:
    return _encode_chunk(chunk, _worker["fmt"], _worker["recipe"], _worker["encoder"])


def source_format(src: SourceConfig, detected: str) -> str:
    """A source's format: its selection (dpo_chosen, kto_good: these detect the layout per chunk),
    else the layout its first chunk detected."""
    return src.format if src.format in SELECT_FORMATS else detected


def _cores() -> int:
    """The cores this process may run on (its affinity, e.g. a slurm allocation's, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _encoded_chunks(src: SourceConfig, recipe: Recipe, encoder: Encoder) -> Any:
    """Encoded chunks of one source, in file order: the first here (it decides the layout), the rest
    in `data.num_proc` worker processes when asked."""
    import multiprocessing

    chunks = iter_source(src)
    first = _encode_chunk(next(chunks), src.format, recipe, encoder)  # chat rows without a template: data/chat.py
    yield first
    fmt = source_format(src, first.format)
    # No more workers than the cores, nor than chunks left: a one-chunk source forks none.
    procs = min(recipe.data.num_proc or 1, _cores())
    ahead = list(itertools.islice(chunks, procs))  # the pool's feeder would read these at once anyway
    chunks = itertools.chain(ahead, chunks)
    procs = min(procs, len(ahead))
    if procs <= 1:
        yield from (_encode_chunk(c, fmt, recipe, encoder) for c in chunks)
        return
    # fork: the workers inherit the encoder (and its tokenizer) instead of unpickling one each;
    # the fast tokenizer's own threads are off in them (not in this process), one process per core.
    _worker.update(fmt=fmt, recipe=recipe, encoder=encoder)
    no_threads = ("TOKENIZERS_PARALLELISM", "false")
    with multiprocessing.get_context("fork").Pool(procs, os.environ.__setitem__, no_threads) as pool:
        yield from pool.imap(_encode_in_worker, chunks)


def _encode_source(
    src: SourceConfig, role: str, recipe: Recipe, encoder: Encoder, out_file: Path, progress: bool
) -> SourceReport:
    """Stream one source through render + encode into an Arrow file; return its report."""
    import numpy as np
    import pyarrow as pa

    report: SourceReport | None = None
    dropped: Counter = Counter()
    changed: Counter = Counter()
    ignored: set[str] = set()
    ignored_keys: Counter = Counter()
    lengths: list[Any] = []
    start, writer = time.perf_counter(), None
    try:
        for done in _encoded_chunks(src, recipe, encoder):
            preemption.stop_if_requested("while preparing the data")  # the partial entry is removed on the way out
            if report is None:
                report = SourceReport(done.where, role, source_format(src, done.format), done.format)
            report.rows += done.rows
            dropped.update(done.dropped)
            changed.update(done.changed)
            ignored.update(done.ignored_columns)
            ignored_keys.update(done.ignored_keys)
            if done.table is not None:
                if writer is None:
                    writer = pa.ipc.new_stream(str(out_file), done.table.schema)
                writer.write_table(done.table)
                lengths.append(done.lengths)
                report.loss_tokens += done.loss_tokens
            rate = report.rows / max(time.perf_counter() - start, 1e-9)
            if progress:
                click.echo(f"sftdist: {report.where}: {report.rows} rows read ({rate:,.0f} rows/s)")
    finally:
        if writer is not None:
            writer.close()
    assert report is not None  # iter_source raises on a source without rows
    report.dropped = {why: n for why, n in dropped.items() if n}
    report.changed = {why: n for why, n in changed.items() if n}
    report.ignored_keys = dict(ignored_keys)
    report.ignored_columns = sorted(ignored)
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    report.kept, report.tokens = len(all_lengths), int(all_lengths.sum())
    report.percentiles = _percentiles(all_lengths)
    if not report.kept:
        too_long = dropped[encoder.too_long] + dropped[encoder.no_loss_left]
        if too_long and too_long == report.rows - dropped["empty response"] - dropped["labelled bad"]:
            what, fix = ("have no loss-carrying token within", "") if recipe.data.truncate else (
                "are longer than", " or set data.truncate: true")
            raise UserError(
                f"{report.where}: all {too_long} samples {what} data.max_length={recipe.data.max_length}; raise max_length{fix}"
            )
        why = "has an empty response" if dropped["empty response"] == report.rows else "is dropped"
        why = "is labelled bad" if dropped["labelled bad"] == report.rows else why
        raise UserError(f"{report.where}: every one of its {report.rows} rows {why}; nothing to train on")
    return report


def build(recipe: Recipe, tokenizer: Any, out: Path, progress: bool = True) -> DataReport:
    """Read, render, encode, mix, split and pack the recipe's data into `out` (a new directory).

    Samples keep their order (sources in recipe order, rows in file order) unless `eval_fraction`
    splits them or `train.shuffle_dataset` asks, as in trl; then they are shuffled with `data.seed`.
    Either way the result depends only on the data and the seed, never on the number of processes
    that will read it; the trainer's sampler shuffles the rows it serves.
    """
    import numpy as np
    from datasets import Dataset, concatenate_datasets

    from sftdist.data.pack import pack, write_rows

    d = recipe.data
    encoder = make_encoder(recipe, tokenizer)
    reports: list[SourceReport] = []
    parts: dict[str, list[Any]] = {"train": [], "eval": []}
    for role, sources in (("train", d.train), ("eval", d.eval)):
        for i, src in enumerate(sources):
            file = out / f"source-{role}-{i}.arrow"
            reports.append(_encode_source(src, role, recipe, encoder, file, progress))
            parts[role].append(Dataset.from_file(str(file)))

    train_ds = concatenate_datasets(parts["train"])
    train_idx, split_off = split_and_weight(
        [len(ds) for ds in parts["train"]], [src.weight for src in d.train], [r.where for r in reports],
        d.eval_fraction, recipe.shuffle_dataset, d.seed, str(recipe.source),
    )
    eval_ds = concatenate_datasets(parts["eval"]) if parts["eval"] else None
    eval_idx = np.arange(len(eval_ds)) if eval_ds is not None else np.zeros(0, dtype=np.int64)
    if len(split_off):
        if eval_ds is None:
            eval_ds, eval_idx = train_ds, split_off
        else:  # eval sources first, then the samples held out of the training sources
            eval_idx = np.concatenate([eval_idx, split_off + len(eval_ds)])
            eval_ds = concatenate_datasets([eval_ds, train_ds])

    write = (lambda ds, f: pack(ds, d.max_length, f)) if d.packing else write_rows
    train = write(train_ds.select(train_idx), out / TRAIN_FILE)
    if eval_ds is not None:
        write(eval_ds.select(eval_idx), out / EVAL_FILE)
    for f in out.glob("source-*.arrow"):
        f.unlink()
    lengths = sample_lengths(train.data.table)
    loss_tokens = _count_loss(train.data.table)
    report = DataReport(
        sources=reports,
        train_samples=len(lengths),
        eval_samples=len(eval_idx),
        train_tokens=int(lengths.sum()),
        train_loss_tokens=loss_tokens,
        packing=d.packing,
        max_length=d.max_length,
        train_rows=len(train),
    )
    (out / REPORT_FILE).write_text(report.to_json(), encoding="utf-8")
    return report


def sample_lengths(table: Any) -> Any:
    """Tokens per training sample, read from the Arrow columns (packed rows keep them in seq_lengths)."""
    import numpy as np
    import pyarrow.compute as pc

    if "seq_lengths" in table.column_names:
        return np.asarray(pc.list_flatten(table.column("seq_lengths")).to_numpy(zero_copy_only=False), dtype=np.int64)
    return np.asarray(pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False), dtype=np.int64)


def _count_loss(table: Any) -> int:
    import pyarrow.compute as pc

    flat = pc.list_flatten(table.column("labels"))
    return int(pc.sum(pc.not_equal(flat, -100)).as_py() or 0)


@dataclass
class Prepared:
    """A verified cache entry and its report; its rows open as memory-mapped `datasets.Dataset`s
    only when asked for, so that a report from a warm entry does not import `datasets`."""

    entry: Path
    report: DataReport
    how: str  # "built" | "hit" | "waited"

    @functools.cached_property
    def train(self) -> Any:
        from datasets import Dataset

        return Dataset.from_file(str(self.entry / TRAIN_FILE))

    @functools.cached_property
    def eval(self) -> Any | None:
        from datasets import Dataset

        return Dataset.from_file(str(self.entry / EVAL_FILE)) if (self.entry / EVAL_FILE).is_file() else None

    def train_table(self) -> Any:
        """The training rows as a memory-mapped Arrow table (pyarrow only)."""
        import pyarrow as pa

        return pa.ipc.open_stream(pa.memory_map(str(self.entry / TRAIN_FILE))).read_all()


def prepare(
    recipe: Recipe, load_tokenizer: Callable[[], Any], force: bool = False, progress: bool = True,
    inputs: dict[str, Any] | None = None,
) -> Prepared:
    """The recipe's prepared data: from the cache, or built into it first (see data/cache.py); `inputs`, the
    cache's fingerprint inputs when the caller computed them already."""
    from sftdist.data.cache import ensure_entry

    rank = os.environ.get("RANK")
    who = f"rank {rank} " if rank is not None else ""
    start = time.perf_counter()

    def build_into(tmp: Path) -> None:
        if progress:
            click.echo(f"sftdist: {who}building the data cache ({tmp.parent})")
        build(recipe, load_tokenizer(), tmp, progress)

    found = ensure_entry(recipe, load_tokenizer, build_into, force=force, inputs=inputs)
    took = f" in {time.perf_counter() - start:.1f} s" if found.how == "built" else ""
    if progress:
        click.echo(f"sftdist: {who}data cache {found.how}{took}: {found.path}")
    report = DataReport.from_json((found.path / REPORT_FILE).read_text(encoding="utf-8"))
    if os.environ.get("RANK", "0") == "0":
        for source in report.sources:
            for line in warnings(source):
                click.echo(line, err=True)
    return Prepared(found.path, report, found.how)
