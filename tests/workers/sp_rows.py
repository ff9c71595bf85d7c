"""Packed rows under DeepSpeed's Ulysses on 2 gloo ranks, as sftdist's sequence-parallel training feeds them:
trl's collator -> `seqpar_batches.GroupPadded` -> DeepSpeed's `UlyssesSPDataLoaderAdapter` -> the model, whose
attention is `seqpar_attention`'s, wrapped by Ulysses as accelerate registers it.

Run under `torchrun --standalone --nproc_per_node 2 tests/workers/sp_rows.py MODEL_DIR OUT_DIR`. Rank 0's batch is
one packed row of samples A B C (91 tokens), rank 1's one of D E (55 tokens). Rank 0 writes OUT_DIR/result.json:
- per attention (`sdpa`, `eager`): the input_ids shapes the model saw; the largest difference between the per-token
  losses under SP and those of one process running each unpadded row with transformers' own packed-sequence mask;
  the largest change of the A, C, D, E tokens' losses when B's tokens are replaced, and of B's own;
- `sdpa_ulysses_alone`: the same change with Ulysses wrapping plain sdpa (what DeepSpeed does without sftdist);
- `unpacked_shapes`: the shapes of unpadded batches of 2 samples (41 and 25 tokens at most) as the model gets them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

LENGTHS = ([37, 23, 31], [29, 26])  # the samples of rank 0's and rank 1's packed row
CHANGED = 1  # B, the second sample of rank 0's row


def samples(vocab: int, changed: bool) -> list[list[list[int]]]:
    g = torch.Generator().manual_seed(0)
    rows = [[torch.randint(3, vocab, (n,), generator=g).tolist() for n in row] for row in LENGTHS]
    if changed:
        other = torch.Generator().manual_seed(1)
        rows[0][CHANGED] = torch.randint(3, vocab, (LENGTHS[0][CHANGED],), generator=other).tolist()
    return rows


def packed_batch(row: list[list[int]]) -> dict:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    flat = [t for s in row for t in s]
    example = {"input_ids": flat, "labels": flat, "seq_lengths": [len(s) for s in row]}
    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([example])


def through_adapter(batch: dict, group, rank: int) -> list[dict]:
    """The micro-batches this rank gets: its shard of rank 0's batch, then of rank 1's."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    from sftdist.seqpar_batches import GroupPadded

    padded = GroupPadded([batch], pad_token_id=0, group=group, size=2, device=torch.device("cpu"))
    return list(UlyssesSPDataLoaderAdapter(padded, sp_rank=rank, sp_group=group, sp_world_size=2, device="cpu"))


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[0].float(), targets[0], ignore_index=-100, reduction="none")


def sp_losses(model, micro_batches: list[dict], group) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Input shapes and whole-row per-token losses (position i predicts token i + 1) of each micro-batch."""
    import torch.distributed as dist

    shapes, losses = [], []
    for mb in micro_batches:
        shapes.append(list(mb["input_ids"].shape))
        with torch.no_grad():
            logits = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
        local = token_losses(logits, mb["shift_labels"])
        parts = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(parts, local, group=group)
        losses.append(torch.cat(parts))
    return shapes, losses


def reference_losses(model, row: list[list[int]]) -> torch.Tensor:
    """One process, the unpadded row, transformers' own packed-sequence mask from the position_ids."""
    batch = packed_batch(row)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    targets = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    return token_losses(logits, targets)


def sample_of_position(row_lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(row_lengths)), torch.tensor(row_lengths))


def ulysses(model, core: str) -> None:
    """Register Ulysses around `core` as accelerate 1.15 does for a trainer (`_prepare_deepspeed`)."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    # Each registration builds the SP groups again, and DeepSpeed refuses to build them twice; its own teardown
    # (a private function) forgets them, as a finished run does.
    parallel_state_sp._release_sequence_parallel_groups()
    UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=core, sequence_parallel_size=2, micro_batch_size=1,
        seq_length_is_variable=True, disable_in_eval=True)


def main(model_dir: str, out: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sftdist.seqpar_attention import use_packed_attention

    deepspeed.init_distributed("gloo")
    rank = dist.get_rank()

    def load(impl: str):
        return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl, dtype=torch.float32)

    result: dict = {}
    real = [sum(n) for n in LENGTHS]
    for impl, packed in (("sdpa", True), ("eager", True), ("sdpa", False)):
        model = load(impl)
        rows = samples(model.config.vocab_size, False)
        # Before Ulysses replaces the implementation it wraps (plain sdpa, in the last run) for every model.
        reference = [reference_losses(model.eval(), row) for row in rows]
        core = use_packed_attention(model) if packed else impl
        ulysses(model, core)
        model.train()  # Ulysses steps aside in eval mode (accelerate registers it with disable_in_eval)
        group = parallel_state_sp.get_sequence_parallel_group()
        runs = {}
        for changed in (False, True):
            rows = samples(model.config.vocab_size, changed)
            runs[changed] = sp_losses(model, through_adapter(packed_batch(rows[rank]), group, rank), group)
        shapes, losses = runs[False]
        changed_losses = runs[True][1]
        entry = {"shapes": shapes, "sp_vs_one_process": max(
            (losses[i][:real[i]] - reference[i]).abs().max().item() for i in range(2))}
        others, own = [], []
        for i in range(2):
            which = sample_of_position(LENGTHS[i])
            diff = (losses[i][:real[i]] - changed_losses[i][:real[i]]).abs()
            is_b = (which == CHANGED) if i == 0 else torch.zeros_like(which, dtype=torch.bool)
            others.append(diff[~is_b].max().item())
            own.append(diff[is_b].max().item() if is_b.any() else 0.0)
        entry["other_samples_change"] = max(others)
        entry["changed_sample_change"] = max(own)
        result[impl if packed else "sdpa_ulysses_alone"] = entry

    # Unpacked batches of two samples: padded by trl to the batch's longest, then to the group's.
    collate = DataCollatorForLanguageModeling(pad_token_id=0, return_position_ids=True)
    g = torch.Generator().manual_seed(2)
    lengths = ([30, 41], [20, 25])[rank]
    batch = collate([{"input_ids": torch.randint(3, 100, (n,), generator=g).tolist()} for n in lengths])
    micro = through_adapter(batch, parallel_state_sp.get_sequence_parallel_group(), rank)
    result["unpacked_shapes"] = [list(mb["input_ids"].shape) for mb in micro]
    result["unpacked_keys"] = sorted(micro[0])
    if rank == 0:
        Path(out, "result.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
