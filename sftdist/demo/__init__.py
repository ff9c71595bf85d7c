"""The demo data set: templated word and number tasks a tiny random model visibly learns on CPU.

Real instruction data needs a real model to show anything in minutes; these tasks have short,
checkable answers over a small vocabulary, so a few minutes of full SFT on the embedded tiny model
move held-out exact match from ~0% to most answers right. Held-out rows are prompts that never occur
in train (new word lists, new number pairs, numbers never asked about), so the gain is not recall.
Rows follow the dolly schema (`instruction`, `context`, `response`); `context` is empty when the
whole question fits in the instruction, so both branches of the prompt template are exercised.
Word lists are written one per line: a byte-level BPE then gives each word the same token in the
context and in the answer (after a space it would be a different, `Ġ`-prefixed token), which is
what lets a 1M-parameter model learn to copy within minutes.
Train it packed at a small max_length (128) with several packed rows per step: best-fit packing
groups rows of equal length, which here means rows of the same task, so one long packed row per step
trains one task at a time and the list tasks were learned far less reliably (51-82% vs 96-97%).
`python -m sftdist.demo` rewrites `train.jsonl` and `heldout.jsonl` byte for byte.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
TRAIN_PATH = DEMO_DIR / "train.jsonl"
HELDOUT_PATH = DEMO_DIR / "heldout.jsonl"

SEED = 1234
HELDOUT_PER_TASK = 20

WORDS = (
    "apple bird cat dog egg fish goat hat ink jam kite lamp moon nest owl pig "
    "queen rain sun tree van wolf box yak zoo bell cup door fox gold milk rose"
).split()

Row = dict[str, str]
Task = Callable[[random.Random], Row]


def _word_list(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(3, 4))


def _row(instruction: str, context: str, response: str) -> Row:
    return {"instruction": instruction, "context": context, "response": response}


def _copy(rng: random.Random) -> Row:
    words = _word_list(rng)
    return _row("Copy the list.", "\n".join(words), "\n".join(words))


def _first(rng: random.Random) -> Row:
    words = _word_list(rng)
    return _row("What is the first word?", "\n".join(words), words[0])


def _last(rng: random.Random) -> Row:
    words = _word_list(rng)
    return _row("What is the last word?", "\n".join(words), words[-1])


def _reverse(rng: random.Random) -> Row:
    words = _word_list(rng)
    return _row("Reverse the list.", "\n".join(words), "\n".join(reversed(words)))


def _count(rng: random.Random) -> Row:
    words = _word_list(rng)
    return _row("How many words are there?", "\n".join(words), str(len(words)))


def _next_number(rng: random.Random) -> Row:
    n = rng.randint(10, 998)
    return _row(f"What number comes after {n}?", "", str(n + 1))


def _larger(rng: random.Random) -> Row:
    a, b = rng.sample(range(10, 100), 2)
    return _row(f"Which number is larger, {a} or {b}?", "", str(max(a, b)))


# Task -> train rows. The list tasks need an induction-style copy circuit, the slowest thing for a
# random model to learn, so they get more rows.
TASKS: dict[str, tuple[Task, int]] = {
    "copy": (_copy, 900),
    "first": (_first, 500),
    "last": (_last, 500),
    "reverse": (_reverse, 900),
    "count": (_count, 500),
    "next_number": (_next_number, 500),
    "larger": (_larger, 500),
}


def generate_rows(seed: int = SEED) -> tuple[list[Row], list[Row]]:
    """Draw held-out rows first, then train rows whose (instruction, context) is new to both splits."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    heldout: list[Row] = []
    train: list[Row] = []
    for split, is_train in ((heldout, False), (train, True)):
        for task, train_rows in TASKS.values():
            per_task = train_rows if is_train else HELDOUT_PER_TASK
            kept = 0
            # Bounded, so a task edited to have too few distinct prompts ends short instead of hanging.
            for _ in range(per_task * 20):
                row = task(rng)
                key = (row["instruction"], row["context"])
                if key not in seen:
                    seen.add(key)
                    split.append(row)
                    kept += 1
                    if kept == per_task:
                        break
    rng.shuffle(train)
    return train, heldout


def write_jsonl(rows: list[Row], path: Path) -> None:
    """Write atomically so an interrupted regeneration never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_demo(train_path: Path = TRAIN_PATH, heldout_path: Path = HELDOUT_PATH, seed: int = SEED) -> None:
    """Regenerate the committed demo files (the default seed reproduces them exactly)."""
    train, heldout = generate_rows(seed)
    write_jsonl(train, train_path)
    write_jsonl(heldout, heldout_path)


def normalize_answer(text: str) -> str:
    """Collapse whitespace so a trailing newline or doubled space is not counted as a wrong answer."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Case-sensitive equality after whitespace normalisation: the demo answers are short and exact."""
    return normalize_answer(prediction) == normalize_answer(reference)
