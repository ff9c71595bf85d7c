"""Which encoded samples train and which evaluate: the eval split and the source weights, as index
arrays (no sample is copied before it is written).

The split comes first and the weights after, so that a held-out sample is never also a training
sample: with `weight: 2.0` and `eval_fraction` > 0, repeating before splitting would put copies of
the same sample on both sides.
"""

from __future__ import annotations

from typing import Any

from sftdist.errors import UserError


def weighted_indices(indices: Any, weight: float, seed: int) -> Any:
    """Mix by weight: 0.5 keeps a random half of a source's samples, 2.0 repeats them twice, 1.5
    once and a half."""
    import numpy as np

    whole, frac = int(weight), weight - int(weight)
    parts = [indices] * whole
    if frac > 0:
        picked = np.random.default_rng(seed).choice(len(indices), size=round(frac * len(indices)), replace=False)
        parts.append(indices[np.sort(picked)])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def split_and_weight(
    sizes: list[int], weights: list[float], names: list[str], eval_fraction: float, shuffle: bool, seed: int, where: str
) -> tuple[Any, Any]:
    """Indices into the concatenated training sources (`sizes` samples each, named `names` in
    errors; `where` names the recipe): (training samples, held-out samples).

    `eval_fraction` holds out that fraction of the distinct samples (before weights, drawn with
    `seed` across all sources); each source's weight then applies to what it has left. Samples
    keep their order (sources in recipe order, rows in file order) unless a split or `shuffle`
    asks for a shuffle, which uses `seed` too.
    """
    import numpy as np

    rng = np.random.default_rng(seed)  # the split, then the order
    total = sum(sizes)
    held = np.zeros(0, dtype=np.int64)
    keep = np.ones(total, dtype=bool)
    if eval_fraction > 0:
        n_eval = max(1, round(total * eval_fraction))
        if n_eval >= total:
            raise UserError(
                f"{where}: data.eval_fraction={eval_fraction} of {total} samples leaves no training rows; lower it or add data"
            )
        held = rng.permutation(total)[:n_eval]
        keep[held] = False
    starts = np.cumsum([0, *sizes])
    parts = []
    for i, (start, weight) in enumerate(zip(starts, weights)):
        own = np.flatnonzero(keep[start : start + sizes[i]]) + start
        if not len(own):
            raise UserError(
                f"{where}: data.eval_fraction={eval_fraction} holds out all {sizes[i]} samples of {names[i]}, "
                "leaving none to train on; lower it or add data"
            )
        idx = weighted_indices(own, weight, seed + i)
        if not len(idx):
            raise UserError(
                f"{where}: data.train[{i}].weight {weight} keeps none of the {len(own)} samples of {names[i]}; raise the weight"
            )
        parts.append(idx)
    train = np.concatenate(parts)
    if eval_fraction > 0 or shuffle:
        train = train[rng.permutation(len(train))]
    return train, held
