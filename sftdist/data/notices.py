"""The warnings a source earns: one line per kind and per source, with counts, never one per row.

They are worded here from counts kept in the cache entry's report (data/pipeline.py), so that they
are printed on every run that uses the entry, not only on the run that built it; `sftdist generate`
words its prompts file's the same way.
"""

from __future__ import annotations

from collections.abc import Mapping


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {why}" for why, n in counts.items() if n)


def source_warnings(
    where: str,
    rows: int,
    dropped: Mapping[str, int],
    changed: Mapping[str, int] | None = None,
    ignored_columns: list[str] | None = None,
    ignored_keys: Mapping[str, int] | None = None,
) -> list[str]:
    """The warning lines for one source: columns and turn keys nothing uses, rows dropped (by
    reason) and rows kept with a change (truncated, empty turns left out of the loss)."""
    lines = []
    if ignored_columns:
        s = "s" if len(ignored_columns) > 1 else ""
        lines.append(f"warning: {where}: ignoring column{s} {', '.join(ignored_columns)}")
    if ignored_keys and any(ignored_keys.values()):
        keys = {key: n for key, n in ignored_keys.items() if n}
        s = "s" if len(keys) > 1 else ""
        counts = ", ".join(f"{key} (in {n} turn{'s' if n > 1 else ''})" for key, n in keys.items())
        lines.append(f"warning: {where}: ignoring key{s} inside turns: {counts}")
    n_dropped = sum(dropped.values())
    kept_note = _counts(changed or {})
    if n_dropped:
        line = f"warning: dropped {n_dropped} of {rows} rows of {where}: {_counts(dropped)}"
        lines.append(line + (f"; kept with changes: {kept_note}" if kept_note else ""))
    elif kept_note:
        lines.append(f"warning: kept all {rows} rows of {where} with changes: {kept_note}")
    return lines
