"""The batches a sequence-parallel group shares, padded only as far as the group's longest one.

Gaps filled (DeepSpeed 0.19.8 `UlyssesSPDataLoaderAdapter`, trl 1.16 `DataCollatorForLanguageModeling`):
- The adapter all-gathers the N ranks' batches, then cuts each into N slices. gloo's all_gather takes equal
  shapes only, and a slice needs a length that N divides; padding every batch to max_length does both, at the
  cost of computing padding whenever the data is shorter. Here each rank's batch is padded to the longest batch
  of its group (one all-reduce of one integer), rounded up to a multiple of N.
- The adapter slices every tensor of a batch as [batch, sequence]; trl's padding-free (packed) batches carry 1-D
  `cu_seq_lens_q/k` (IndexError in `refill`). Those and the other varlen keys describe the unsplit row for the
  attention kernels; they are dropped, and the sample boundaries reach the attention through the position_ids,
  which Ulysses gathers again in every layer (see seqpar_attention).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sftdist.fast_head import VARLEN_KEYS


class GroupPadded:
    """Wraps the training DataLoader that DeepSpeed's adapter reads: every batch it yields has the sequence length
    the whole sequence-parallel group agreed on for this step."""

    def __init__(self, loader: Any, pad_token_id: int, group: Any, size: int, device: Any) -> None:
        self.loader, self.pad_token_id, self.group, self.size, self.device = loader, pad_token_id, group, size, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield self.pad(batch)

    def pad(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` without the varlen keys, its [batch, sequence] tensors padded on the right to the group's length."""
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        batch = {k: v for k, v in batch.items() if k not in VARLEN_KEYS}
        length = batch["input_ids"].shape[1]
        longest = torch.tensor([length], dtype=torch.int64, device=self.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=self.group)
        target = -(-int(longest.item()) // self.size) * self.size
        fill = {"input_ids": self.pad_token_id, "labels": -100}  # 0 for the others: position_ids, attention_mask
        return {
            k: F.pad(v, (0, target - length), value=fill.get(k, 0)) if torch.is_tensor(v) and v.dim() == 2 else v
            for k, v in batch.items()
        }


def pad_to_group(accelerator: Any, pad_token_id: int) -> None:
    """Have `accelerator` hand DeepSpeed's adapter the training DataLoader wrapped in `GroupPadded`.

    accelerate 1.15's `deepspeed_ulysses_dl_adapter` (called by transformers' training loop once the model is
    prepared) is where the adapter is built around the loader: the one place to reach the loader first.
    """
    from deepspeed.utils import groups

    adapt = accelerator.deepspeed_ulysses_dl_adapter

    def padded_adapter(loader: Any, model: Any) -> Any:
        # (no public accessor of the SP group in DeepSpeed; accelerate's adapter call uses the same)
        group = groups._get_sequence_parallel_group()
        size = groups._get_sequence_parallel_world_size()
        return adapt(GroupPadded(loader, pad_token_id, group, size, model.device), model)

    accelerator.deepspeed_ulysses_dl_adapter = padded_adapter
