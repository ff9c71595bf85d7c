"""Loaders and scoring of the two demo tasks (lm-eval imports this file by path from the task YAMLs).

The data is the held-out demo split (`sftdist/demo/heldout.jsonl`), read through the package so the
tasks work from any working directory and offline; answers are scored by sftdist's own exact match,
the one `sftdist generate --compare` and `sftdist eval --prompts-file` use.
"""

from __future__ import annotations

import json
import re
from typing import Any


def _rows(**kwargs: Any) -> list[dict[str, str]]:
    from sftdist.demo import HELDOUT_PATH

    path = kwargs.get("data_file") or HELDOUT_PATH
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_generative(**kwargs: Any) -> Any:
    """Every held-out row: the model must write the exact answer."""
    return _dataset(_rows(**kwargs))


_LARGER = re.compile(r"^Which number is larger, (\d+) or (\d+)\?$")


def _choices(row: dict[str, str]) -> list[str] | None:
    """The candidate answers of a row whose answer is one of a few: a word of the list, one of two numbers."""
    if row["instruction"] in ("What is the first word?", "What is the last word?"):
        return row["context"].split("\n")
    m = _LARGER.match(row["instruction"])
    return [m.group(1), m.group(2)] if m else None


def load_multiple_choice(**kwargs: Any) -> Any:
    """The held-out rows with a closed set of answers (first/last word, the larger number)."""
    rows = []
    for row in _rows(**kwargs):
        choices = _choices(row)
        if choices is not None:
            rows.append({**row, "choices": choices, "gold": choices.index(row["response"])})
    return _dataset(rows)


def process_exact_match(doc: dict[str, str], results: list[str]) -> dict[str, float]:
    from sftdist.metrics import exact_match

    return {"exact_match": float(exact_match(results[0], doc["response"]))}
