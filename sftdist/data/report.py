"""`sftdist data` and `sftdist prepare`: what training will see, per source and in total, before any
GPU time is spent.

The figures come from the cache entry that training reads (data/pipeline.py builds it, trl's
best-fit-decreasing packer packs it), so the report cannot drift from the run.
"""

from __future__ import annotations

import functools
import random

import click

from sftdist.data.pipeline import Prepared, SourceReport, prepare, sample_lengths
from sftdist.recipe import Recipe


def packing_efficiency(lengths: list[int], max_length: int) -> tuple[float, int]:
    """Real tokens / token slots after trl's BFD packing, and the number of packed rows (for a recipe
    with packing off, to show what it would buy)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    packed = pack_dataset(Dataset.from_dict({"input_ids": [[0] * n for n in lengths]}), max_length, "bfd")
    return sum(lengths) / (len(packed) * max_length), len(packed)


def padding_efficiency(lengths: list[int], batch_size: int, seed: int) -> float:
    """Real tokens / token slots when shuffled samples are padded to the longest in each batch."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    slots = sum(max(order[i : i + batch_size]) * len(order[i : i + batch_size]) for i in range(0, len(order), batch_size))
    return sum(order) / slots if slots else 0.0


def _source_lines(r: SourceReport) -> list[str]:
    dropped = ", ".join(f"{n} {why}" for why, n in r.dropped.items()) or "none"
    lines = [f"{r.role} source {r.where}", f"  format: {r.format}", f"  rows: {r.rows}, kept {r.kept}, dropped: {dropped}"]
    if r.changed:
        lines.append(f"  kept with changes: {', '.join(f'{n} {why}' for why, n in r.changed.items())}")
    if r.kept:
        p = r.percentiles
        lines.append(f"  tokens per sample: p50 {p['p50']} p90 {p['p90']} p99 {p['p99']} max {p['max']}")
        lines.append(f"  tokens: {r.tokens}, carrying loss: {r.loss_tokens} ({r.loss_tokens / r.tokens:.1%})")
    return lines


def summarize(recipe: Recipe, data: Prepared) -> list[str]:
    rep = data.report
    lines: list[str] = []
    for r in rep.sources:
        lines += _source_lines(r)
    lengths = sample_lengths(data.train_table()).tolist()
    batch = recipe.per_device_batch
    pad = padding_efficiency(lengths, batch, recipe.data.seed)
    lines += [
        "total",
        f"  train samples: {rep.train_samples} (after weights), eval samples: {rep.eval_samples}",
        f"  train tokens: {rep.train_tokens}, carrying loss: {rep.train_loss_tokens} "
        f"({rep.train_loss_tokens / max(1, rep.train_tokens):.1%})",
    ]
    if rep.packing:
        rows, eff = rep.train_rows, rep.train_tokens / (rep.train_rows * rep.max_length)
    else:
        eff, rows = packing_efficiency(lengths, rep.max_length)
    lines.append(f"  packing at max_length {rep.max_length}: {rows} rows, efficiency {eff:.1%} (real tokens / slots)")
    lines += [
        f"  without packing, batch {batch} padded to its longest: efficiency {pad:.1%} ({1 - pad:.1%} padding)",
        f"  packing is {'on' if rep.packing else 'off'} in this recipe",
        f"  cache entry: {data.entry}",
    ]
    return lines


def _prepared(recipe: Recipe, force: bool = False, progress: bool = True) -> Prepared:
    """The recipe's prepared data; the tokenizer is loaded only if the entry must be built."""
    from sftdist.model import load_tokenizer

    return prepare(recipe, functools.cache(lambda: load_tokenizer(recipe)), force=force, progress=progress)


def report_data(recipe: Recipe, force: bool = False) -> None:
    """Print the per-source and total report (building the cache entry if needed)."""
    click.echo("\n".join(summarize(recipe, _prepared(recipe, force))))


def check_data(recipe: Recipe) -> None:
    """Run every data check (tokenizer only, no model); exit 0 with one line when all pass."""
    data = _prepared(recipe, progress=False)
    kept = sum(r.kept for r in data.report.sources)
    click.echo(f"ok: {len(data.report.sources)} sources, {kept} samples pass every check")
