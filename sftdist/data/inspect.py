"""`sftdist data`: what training will see, per source and in total, before any GPU time is spent.

The figures come from the same pipeline as training (data/pipeline.py), and the packing figure from
trl's own best-fit-decreasing packer, so the report cannot drift from the run.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import click

from sftdist.data.pipeline import PreparedData, SourceReport, prepare_data
from sftdist.recipe import Recipe


def percentile(values: list[int], q: float) -> int:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else 0


def packing_efficiency(lengths: list[int], max_length: int) -> tuple[float, int]:
    """Real tokens / token slots after trl's BFD packing, and the number of packed rows."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    if not lengths:
        return 0.0, 0
    ds = Dataset.from_dict({"input_ids": [[0] * n for n in lengths]})
    packed = pack_dataset(ds, max_length, "bfd")
    return sum(lengths) / (len(packed) * max_length), len(packed)


def padding_efficiency(lengths: list[int], batch_size: int, seed: int) -> float:
    """Real tokens / token slots when shuffled samples are padded to the longest in each batch."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    slots = sum(max(order[i : i + batch_size]) * len(order[i : i + batch_size]) for i in range(0, len(order), batch_size))
    return sum(order) / slots if slots else 0.0


def _dropped(c: Counter) -> str:
    return ", ".join(f"{n} {why}" for why, n in c.items()) or "none"


def _source_lines(r: SourceReport) -> list[str]:
    lines = [f"{r.role} source {r.where}", f"  format: {r.format}", f"  rows: {r.rows}, kept {r.kept}, dropped: {_dropped(r.dropped)}"]
    if r.lengths:
        lines.append(
            "  tokens per sample: p50 {} p90 {} p99 {} max {}".format(
                *(percentile(r.lengths, q) for q in (50, 90, 99, 100))
            )
        )
        total = sum(r.lengths)
        lines.append(f"  tokens: {total}, carrying loss: {r.loss_tokens} ({r.loss_tokens / total:.1%})")
    return lines


def summarize(recipe: Recipe, data: PreparedData) -> list[str]:
    lines: list[str] = []
    for r in data.reports:
        lines += _source_lines(r)
    lengths = [len(x) for x in data.train["input_ids"]]
    loss_tokens = sum(sum(m) for m in data.train["completion_mask"])
    batch = int(recipe.train.get("per_device_train_batch_size", 8))
    eff, rows = packing_efficiency(lengths, recipe.data.max_length)
    pad = padding_efficiency(lengths, batch, recipe.data.seed)
    n_eval = len(data.eval["input_ids"]) if data.eval else 0
    lines += [
        "total",
        f"  train samples: {len(lengths)} (after weights), eval samples: {n_eval}",
        f"  train tokens: {sum(lengths)}, carrying loss: {loss_tokens} ({loss_tokens / max(1, sum(lengths)):.1%})",
        f"  packing at max_length {recipe.data.max_length}: {rows} rows, efficiency {eff:.1%} (real tokens / slots)",
        f"  without packing, batch {batch} padded to its longest: efficiency {pad:.1%} ({1 - pad:.1%} padding)",
        f"  packing is {'on' if recipe.data.packing else 'off'} in this recipe",
    ]
    return lines


def _load(recipe: Recipe) -> tuple[Any, PreparedData]:
    from sftdist.model import load_tokenizer

    tokenizer = load_tokenizer(recipe)
    return tokenizer, prepare_data(recipe, tokenizer)


def report_data(recipe: Recipe) -> None:
    """Print the per-source and total report."""
    _, data = _load(recipe)
    click.echo("\n".join(summarize(recipe, data)))


def check_data(recipe: Recipe) -> None:
    """Run every data check (tokenizer only, no model); exit 0 silently-but-one-line when all pass."""
    from sftdist.preflight import check_recipe

    check_recipe(recipe)  # the settings `train` checks before writing (config.json only, no weights)
    _, data = _load(recipe)
    kept = sum(r.kept for r in data.reports)
    click.echo(f"ok: {len(data.reports)} sources, {kept} samples pass every check")
