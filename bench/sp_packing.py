"""Sequence parallelism on long samples of mixed lengths: packed rows vs unpacked samples, real tokens per second
and peak memory per rank.

One invocation runs three modes, each in its own torchrun group of --sp ranks on CPU/gloo, on the same samples
(lengths drawn log-uniform between --min-tokens and --max-length, random token ids, loss on every token):

    .venv/bin/python bench/sp_packing.py                        # the tiny model, 12 samples of 1k-16k tokens, sp 2
    .venv/bin/python bench/sp_packing.py --model DIR --samples 24 --max-length 32768

- packed: the samples packed into rows of at most --max-length tokens by sftdist's packer (data/pack.py, trl's
  best-fit decreasing), one row per micro-batch, as sftdist trains `data.packing: true` under SP;
- unpacked: one sample per micro-batch, each step padded to the longer sample of the group (this version);
- unpacked, padded to max_length: what sftdist did before packing worked under SP (trl's collator padding every
  batch to max_length, Ulysses around plain sdpa).
Every mode goes through the training path's pieces: trl's collator, `seqpar_batches.GroupPadded`, DeepSpeed's
`UlyssesSPDataLoaderAdapter`, Ulysses around `seqpar_attention` (plain sdpa for the last mode), and one forward +
backward of every micro-batch (no optimizer step: its cost does not depend on the tokens). Per mode it reports the
real tokens (samples' tokens, padding excluded) per second of the slowest rank (wall clock, and per CPU second of
that rank, which a machine shared with other jobs changes less), and the peak RSS growth of the largest rank over
the loop (activations, gradients, buffers). A packed row count that the ranks do not divide leaves the last row
out (the real tokens column says how many were trained).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import tempfile
import time
from pathlib import Path

from sp_memory import model_or_tiny, rss_bytes, run_workers

MODES = ("packed", "unpacked", "unpacked-max-length")


def sample_lengths(n: int, low: int, high: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [int(math.exp(rng.uniform(math.log(low), math.log(high)))) for _ in range(n)]


def examples(mode: str, lengths: list[int], max_length: int, vocab: int, tmp: str) -> list[dict]:
    """The micro-batches' rows, in order: one per sample, or the packed rows (with their samples' lengths)."""
    import torch
    from datasets import Dataset

    from sftdist.data.pack import pack

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    rows = Dataset.from_dict({"input_ids": ids, "labels": ids})
    if mode == "packed":
        rows = pack(rows, max_length, Path(tmp) / "packed.arrow")
    return [dict(r) for r in rows]


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF, UlyssesSPDataLoaderAdapter
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sftdist.seqpar_attention import use_packed_attention
    from sftdist.seqpar_batches import GroupPadded

    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    core = "sdpa" if args.mode == "unpacked-max-length" else use_packed_attention(model)
    UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=core, sequence_parallel_size=world, micro_batch_size=1,
        seq_length_is_variable=True, disable_in_eval=True)
    group = parallel_state_sp.get_sequence_parallel_group()

    lengths = sample_lengths(args.samples, args.min_tokens, args.max_length, args.seed)
    rows = examples(args.mode, lengths, args.max_length, model.config.vocab_size, args.out)
    rows = rows[: len(rows) - len(rows) % world]  # every refill takes one row from each rank
    mine = rows[rank::world]
    collate = DataCollatorForLanguageModeling(
        pad_token_id=0, padding_free=args.mode == "packed", return_position_ids=True,
        pad_to_multiple_of=args.max_length if args.mode == "unpacked-max-length" else None)
    loader = GroupPadded([collate([r]) for r in mine], 0, group, world, torch.device("cpu"))
    micro_batches = UlyssesSPDataLoaderAdapter(loader, sp_rank=rank, sp_group=group, sp_world_size=world,
                                               device="cpu")
    model.train()
    before = rss_bytes()
    start, cpu_start = time.perf_counter(), time.process_time()
    seen = 0
    for mb in micro_batches:
        logits = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"]).logits
        labels = mb["shift_labels"]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        (loss / labels.numel()).backward()
        seen += mb["input_ids"].numel()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_growth": max(0, peak - before),
        "model_tokens": seen, "real_tokens": sum(len(r["input_ids"]) for r in mine), "micro_batches": len(mine) * world,
    }))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: sftdist make-tiny-model in a temporary folder)")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--min-tokens", type=int, default=1024)
    ap.add_argument("--max-length", type=int, default=16384)
    ap.add_argument("--sp", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        shared = ["--model", model_or_tiny(args.model, tmp), "--samples", str(args.samples), "--min-tokens",
                  str(args.min_tokens), "--max-length", str(args.max_length), "--seed", str(args.seed)]
        # Each rank gets cores / N threads, so that the N ranks use every core.
        results = {mode: run_workers(__file__, args.sp, max(1, cores // args.sp), [*shared, "--mode", mode])
                   for mode in MODES}
    lengths = sample_lengths(args.samples, args.min_tokens, args.max_length, args.seed)
    mib = 1 / 2**20
    print(f"model {args.model or 'tiny (sftdist make-tiny-model)'}, {args.samples} samples of {min(lengths)}-"
          f"{max(lengths)} tokens ({sum(lengths)} in all), max_length {args.max_length}, sp {args.sp}, fp32, sdpa, "
          f"{cores} CPU cores")
    print("| mode | micro-batches | tokens the model got | real tokens | s (slowest rank) | CPU s (slowest rank) "
          "| real tokens/s | peak RSS growth MiB (max rank) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rate, cpu_rate, memory = {}, {}, {}
    for mode, ranks in results.items():
        seconds, cpu = max(r["seconds"] for r in ranks), max(r["cpu_seconds"] for r in ranks)
        real = sum(r["real_tokens"] for r in ranks)
        rate[mode], cpu_rate[mode], memory[mode] = real / seconds, real / cpu, max(r["peak_rss_growth"] for r in ranks)
        print(f"| {mode} | {ranks[0]['micro_batches']} | {sum(r['model_tokens'] for r in ranks)} | {real} | "
              f"{seconds:.1f} | {cpu:.1f} | {rate[mode]:.0f} | {memory[mode] * mib:.0f} |")
    for base in MODES[1:]:
        print(f"- packed / {base}: real tokens/s **{rate['packed'] / rate[base]:.2f}x** (per CPU second "
              f"{cpu_rate['packed'] / cpu_rate[base]:.2f}x), peak RSS growth per rank "
              f"**{memory['packed'] / memory[base]:.2f}x**")

if __name__ == "__main__":
    main()
