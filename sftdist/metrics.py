"""Scores of generated answers against references: the one place `generate --compare` and
`sftdist eval --prompts-file` (and the demo lm-eval task) compute them.

exact_match is sftdist's own (whitespace-normalised equality, see sftdist.demo); rouge (ROUGE-L F1,
rouge-score), bleu and chrf (sacrebleu, corpus-level) come from the libraries lm-eval itself uses, so
the figures read like lm-eval's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sftdist.demo import exact_match
from sftdist.errors import UserError

METRICS = ("exact_match", "rouge", "bleu", "chrf")

__all__ = ["METRICS", "exact_match", "score"]


def _mean_stderr(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def score(metric: str, predictions: Sequence[str], references: Sequence[str]) -> tuple[float, float | None]:
    """(value, standard error) of `metric` over the answers, each in [0, 1] (bleu/chrf divided by 100);
    per-answer metrics have the standard error of their mean, corpus-level ones none (None)."""
    if not predictions or len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if metric == "exact_match":
        return _mean_stderr([float(exact_match(p, r)) for p, r in zip(predictions, references)])
    try:
        if metric == "rouge":
            from rouge_score import rouge_scorer

            scorer = rouge_scorer.RougeScorer(["rougeL"])
            return _mean_stderr([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)])
        import sacrebleu
    except ImportError:
        raise UserError(f"--metric {metric} needs the eval extra: pip install 'sftdist[eval]'") from None
    if metric == "bleu":
        return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100, None
    if metric == "chrf":
        return sacrebleu.corpus_chrf(list(predictions), [list(references)]).score / 100, None
    raise UserError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
