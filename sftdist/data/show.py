"""`sftdist data RECIPE --show N`: the first N samples of each source as training sees them.

Each sample is decoded run by run, and the tokens that carry loss are marked: green on a terminal,
`[[...]]` otherwise. This is how a mask (chat template, tool results, per-turn weights) is checked
before any GPU time is spent; samples go through the same render and Encoder as training, cut at
`max_length` with `truncate` and marked as dropped without it, as training sees them.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from sftdist.recipe import Recipe

OPEN, CLOSE = "[[", "]]"


def mark_loss(tokenizer: Any, ids: list[int], mask: list[int], colour: bool) -> str:
    """The decoded sample with each run of loss-carrying tokens marked."""
    out: list[str] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or bool(mask[i]) != bool(mask[start]):
            text = tokenizer.decode(ids[start:i])
            if mask[start]:
                text = click.style(text, fg="green", bold=True) if colour else f"{OPEN}{text}{CLOSE}"
            out.append(text)
            start = i
    return "".join(out)


def show_data(recipe: Recipe, n: int) -> None:
    """Print the first `n` rendered samples of every train and eval source, loss tokens marked."""
    from sftdist.data.formats import render_rows
    from sftdist.data.load import read_source
    from sftdist.data.pipeline import make_encoder
    from sftdist.model import load_tokenizer

    tokenizer = load_tokenizer(recipe)
    encoder = make_encoder(recipe, tokenizer)
    colour = sys.stdout.isatty()
    legend = "green" if colour else f"{OPEN}bracketed{CLOSE}"
    click.echo(f"tokens that carry loss are {legend}")
    for role, sources in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        for src in sources:
            rows = read_source(src)
            rendered = render_rows(rows.rows, rows.labels, src.format, recipe.data.template, rows.where)
            click.echo(f"=== {role} source {rows.where} (format: {rendered.format})")
            for k, ex in enumerate(rendered.examples[:n], start=1):
                whole, mask = encoder.encode_one(ex, f"{rows.where} sample {k}")
                ids, mask, outcome = encoder.fit(whole, mask)
                if outcome in (encoder.too_long, encoder.no_loss_left):
                    click.echo(f"--- sample {k}: {len(whole)} tokens, dropped in training: {outcome}")
                    continue
                cut = f" of {len(whole)} ({outcome})" if outcome else ""
                click.echo(f"--- sample {k}: {len(ids)} tokens{cut}, {sum(mask)} carry loss")
                click.echo(mark_loss(tokenizer, ids, mask, colour))
