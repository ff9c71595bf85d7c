"""Packed rows, computed once when the cache entry is built (step 4 of read -> render -> encode ->
pack -> cache).

trl's best-fit-decreasing packer does the work; what we add is when it runs. trl packs inside
`SFTTrainer.__init__`, in every rank, on every start. Here it runs once, on the samples in the order
data/pipeline.py gives them (file order, or shuffled with `data.seed` when asked), so the packed
rows depend only on the data and the seed, never on how many processes read them, and a resume at
another world size sees the same rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pack(dataset: Any, max_length: int, out_file: Path) -> Any:
    """BFD-pack `dataset` (input_ids + labels) into rows of at most `max_length` tokens, written to
    `out_file`; each row's `seq_lengths` lets the collator restart position_ids per sample."""
    from trl.data_utils import pack_dataset

    return pack_dataset(
        dataset, max_length, "bfd", {"cache_file_name": str(out_file), "load_from_cache_file": False}
    )


def write_rows(dataset: Any, out_file: Path) -> Any:
    """The unpacked case: the selected rows written in order to `out_file`."""
    return dataset.flatten_indices(cache_file_name=str(out_file), keep_in_memory=False)
