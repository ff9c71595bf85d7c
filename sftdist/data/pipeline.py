"""Recipe `data:` -> tokenized train/eval rows plus a per-source report.

One path serves `sftdist train`, `sftdist data` and `sftdist data --check`, so what the report says
is what training sees: read -> render -> encode -> weight -> split.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import click

from sftdist.data.encode import Encoder, stop_token_ids
from sftdist.data.formats import CHAT_FORMATS, render_rows
from sftdist.data.load import apply_weight, read_source
from sftdist.errors import UserError
from sftdist.recipe import Recipe, SourceConfig


@dataclass
class SourceReport:
    """What happened to one source's rows."""

    where: str
    role: str  # "train" | "eval"
    format: str
    rows: int
    dropped: Counter
    lengths: list[int] = field(default_factory=list)
    loss_tokens: int = 0

    @property
    def kept(self) -> int:
        return len(self.lengths)


@dataclass
class PreparedData:
    """Tokenized rows (`input_ids`, `completion_mask`) ready for `datasets.Dataset.from_dict`."""

    train: dict[str, list[list[int]]]
    eval: dict[str, list[list[int]]] | None
    reports: list[SourceReport]


def _warn_dropped(report: SourceReport) -> None:
    """One stderr line per source with the counts (never one per row), from rank 0 only."""
    if not report.dropped or os.environ.get("RANK", "0") != "0":
        return
    dropped = sum(n for why, n in report.dropped.items() if not why.endswith("(kept)"))
    reasons = ", ".join(f"{n} {why}" for why, n in report.dropped.items())
    click.echo(f"warning: dropped {dropped} of {report.rows} rows of {report.where}: {reasons}", err=True)


def _encode_source(
    src: SourceConfig, role: str, recipe: Recipe, encoder: Encoder, tokenizer: Any
) -> tuple[SourceReport, list[tuple[list[int], list[int]]]]:
    rows = read_source(src)
    rendered = render_rows(rows.rows, rows.labels, src.format, recipe.data.template, rows.where)
    report = SourceReport(rows.where, role, rendered.format, len(rows.rows), rendered.dropped)
    if rendered.format in CHAT_FORMATS and not tokenizer.chat_template:
        raise UserError(
            f"{rows.where}: format '{rendered.format}' needs a chat template, and the tokenizer of "
            f"{recipe.model.name_or_path} has none; set data.chat_template (e.g. chatml)"
        )
    enc = encoder.encode(rendered.examples, rows.where)
    if enc.too_long:
        report.dropped[f"longer than max_length {recipe.data.max_length}"] += enc.too_long
    if enc.truncated:
        report.dropped[f"truncated to max_length {recipe.data.max_length} (kept)"] += enc.truncated
    if not enc.input_ids:
        raise UserError(
            f"{rows.where}: all {len(rendered.examples)} samples are longer than data.max_length="
            f"{recipe.data.max_length}; raise max_length or set data.truncate: true"
        )
    _warn_dropped(report)
    report.lengths = [len(x) for x in enc.input_ids]
    report.loss_tokens = sum(sum(m) for m in enc.completion_mask)
    return report, list(zip(enc.input_ids, enc.completion_mask))


def _columns(pairs: list[tuple[list[int], list[int]]]) -> dict[str, list[list[int]]]:
    return {"input_ids": [p[0] for p in pairs], "completion_mask": [p[1] for p in pairs]}


def make_encoder(recipe: Recipe, tokenizer: Any, generation_config: Any = None) -> Encoder:
    d = recipe.data
    return Encoder(tokenizer, d.max_length, d.loss_on, d.truncate, stop_token_ids(tokenizer, generation_config))


def prepare_data(recipe: Recipe, tokenizer: Any, generation_config: Any = None) -> PreparedData:
    """Read, check, render and encode every source (the tokenizer is needed: lengths are in tokens)."""
    encoder = make_encoder(recipe, tokenizer, generation_config)
    reports: list[SourceReport] = []
    train: list[tuple[list[int], list[int]]] = []
    for i, src in enumerate(recipe.data.train):
        report, pairs = _encode_source(src, "train", recipe, encoder, tokenizer)
        reports.append(report)
        train += apply_weight(pairs, src.weight, recipe.data.seed + i)
    evals: list[tuple[list[int], list[int]]] = []
    for src in recipe.data.eval:
        report, pairs = _encode_source(src, "eval", recipe, encoder, tokenizer)
        reports.append(report)
        evals += pairs
    if recipe.data.eval_fraction > 0:
        rng = random.Random(recipe.data.seed)
        rng.shuffle(train)
        n_eval = max(1, round(len(train) * recipe.data.eval_fraction))
        if n_eval >= len(train):
            raise UserError(
                f"{recipe.source}: data.eval_fraction={recipe.data.eval_fraction} of {len(train)} samples "
                "leaves no training rows; lower it or add data"
            )
        evals, train = evals + train[:n_eval], train[n_eval:]
    return PreparedData(_columns(train), _columns(evals) if evals else None, reports)
