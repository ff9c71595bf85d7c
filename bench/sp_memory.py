"""Activation memory per rank for one long sample: sequence parallelism 1 (one process) vs N (DeepSpeed Ulysses).

One invocation runs both, each in its own torchrun group on CPU/gloo, and prints the ratio:

    .venv/bin/python bench/sp_memory.py                    # the tiny model, a 16,384-token sample, sp 1 vs 2
    .venv/bin/python bench/sp_memory.py --model DIR --tokens 8192 --sp 2

Each rank runs one forward + backward of its share of the sample (N ranks: 1/N of the tokens each, with the
attention swapped for Ulysses' as `seqpar`'s trainer path does) and reports:
- saved for backward: bytes of the distinct tensor storages autograd keeps between forward and backward
  (the activations; parameters excluded), taken with `torch.autograd.graph.saved_tensors_hooks`;
- peak RSS growth: the process's peak resident memory during the step minus its resident memory before it
  (activations plus transient buffers and gradients, as the allocator saw them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(model_dir: str, tokens: int, out: str) -> None:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    ids = torch.randint(3, model.config.vocab_size, (1, tokens))
    pos = torch.arange(tokens).unsqueeze(0)
    shift = F.pad(ids, (0, 1), value=-100)[:, 1:]
    if world > 1:
        import deepspeed
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        deepspeed.init_distributed("gloo")
        UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=world,
            micro_batch_size=1, seq_length_is_variable=True)
        chunk = tokens // world
        ids, pos, shift = (t[:, rank * chunk:(rank + 1) * chunk] for t in (ids, pos, shift))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    before = rss_bytes()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, position_ids=pos).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), shift.flatten(), ignore_index=-100, reduction="sum")
    held = sum(saved.values())
    (loss / tokens).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "local_tokens": int(ids.shape[1]), "saved_bytes": held,
         "peak_rss_growth": max(0, peak - before), "seconds": seconds}))
    if world > 1:
        torch.distributed.destroy_process_group()


def run_workers(script: str, procs: int, threads: int, worker_args: list[str]) -> list[dict]:
    """Run `script --worker WORKER_ARGS --out DIR` as a torchrun group of `procs` ranks of `threads` threads each;
    the rank{N}.json reports the ranks write to DIR, in rank order (also bench/sp_packing.py's runner)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               script, "--worker", *worker_args, "--out", out]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def model_or_tiny(model: str | None, tmp: str) -> str:
    """`model`, or the tiny model (`sftdist make-tiny-model`) built in `tmp`."""
    if model is not None:
        return model
    from sftdist.tiny import make_tiny_model

    make_tiny_model(str(Path(tmp) / "tiny"), seed=0)
    return str(Path(tmp) / "tiny")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: sftdist make-tiny-model in a temporary folder)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--sp", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.model, args.tokens, args.out)
        return
    if args.tokens % args.sp:
        sys.exit(f"--tokens {args.tokens} must be a multiple of --sp {args.sp}")
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        worker_args = ["--model", model_or_tiny(args.model, tmp), "--tokens", str(args.tokens)]
        # Both runs use every core: 1 process x all threads, N processes x cores/N threads.
        base = run_workers(__file__, 1, cores, worker_args)
        sp = run_workers(__file__, args.sp, max(1, cores // args.sp), worker_args)
    mib = 1 / 2**20
    print(f"model {args.model or 'tiny (sftdist make-tiny-model)'}, one sample of {args.tokens} tokens, fp32, "
          f"{cores} CPU cores")
    print("| run | tokens per rank | saved for backward MiB (max rank) | peak RSS growth MiB (max rank) | step s |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in (("sp 1", base), (f"sp {args.sp}", sp)):
        print(f"| {name} | {rows[0]['local_tokens']} | {max(r['saved_bytes'] for r in rows) * mib:.1f} | "
              f"{max(r['peak_rss_growth'] for r in rows) * mib:.1f} | {max(r['seconds'] for r in rows):.2f} |")
    for key, label in (("saved_bytes", "saved for backward"), ("peak_rss_growth", "peak RSS growth")):
        ratio = max(r[key] for r in sp) / max(r[key] for r in base)
        print(f"- sp {args.sp} / sp 1, {label} per rank: **{ratio:.2f}x**")


if __name__ == "__main__":
    main()
