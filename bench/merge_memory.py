"""Peak memory of `sftdist merge-adapter` vs peft's `merge_and_unload` + `save_pretrained`.

Builds a Llama-shaped model (~270 MB in float32) written in >= 4 shards and a LoRA adapter with
non-zero deltas, then runs, each in its own process: an import-only baseline, `sftdist merge-adapter
--no-verify` (the streaming merge), `sftdist merge-adapter` (plus verification, which loads whole
models one at a time), and peft's merge of the same adapter. Peak RSS of each process comes from
`os.wait4` (that child's own ru_maxrss). Run from the repository root:

    .venv/bin/python bench/merge_memory.py [--workdir DIR] [--shard-size 50MB]
    .venv/bin/python bench/merge_memory.py --smoke   # a 2-layer model in KB-sized shards: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SFTDIST = [sys.executable, "-m", "sftdist"]
PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out, shard = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size=shard)
"""
BASELINE = "import torch, transformers, peft, safetensors; from transformers import AutoModelForCausalLM"
SHAPE = {"vocab_size": 16000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6,
         "num_attention_heads": 12, "num_key_value_heads": 12}
SMOKE_SHAPE = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 4}
BUILD = """
import json, sys, torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
base, adapter, shard, shape = sys.argv[1:5]
torch.manual_seed(0)
cfg = LlamaConfig(max_position_embeddings=256, **json.loads(shape))
model = LlamaForCausalLM(cfg)
model.save_pretrained(base, max_shard_size=shard)
peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
with torch.no_grad():
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.02)
peft_model.save_pretrained(adapter)
"""


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """Run cmd; return (peak RSS of that process in MB, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", help="Keep the built model here (default: a temporary directory).")
    ap.add_argument("--shard-size", default="50MB")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer model in 100KB shards: checks that it runs")
    args = ap.parse_args()
    if args.smoke:
        args.shard_size = "100KB"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="merge-bench-"))
    base, adapter = work / "base", work / "adapter"
    if not base.is_dir():
        shape = SMOKE_SHAPE if args.smoke else SHAPE
        subprocess.run([sys.executable, "-c", BUILD, str(base), str(adapter), args.shard_size, json.dumps(shape)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = sorted(base.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards) / 1e6
    largest = max(p.stat().st_size for p in shards) / 1e6
    adapter_mb = (adapter / "adapter_model.safetensors").stat().st_size / 1e6
    print(f"model: {total:.1f} MB in {len(shards)} shards (largest {largest:.1f} MB); adapter {adapter_mb:.1f} MB")

    runs = {
        "baseline (imports only)": [sys.executable, "-c", BASELINE],
        "sftdist merge-adapter --no-verify": [*SFTDIST, "merge-adapter", "--base", str(base), "--adapter",
                                              str(adapter), "--out", str(work / "out-stream"), "--no-verify"],
        "sftdist merge-adapter (verify on)": [*SFTDIST, "merge-adapter", "--base", str(base), "--adapter",
                                              str(adapter), "--out", str(work / "out-verify")],
        "peft merge_and_unload + save_pretrained": [sys.executable, "-c", PEFT_MERGE, str(base), str(adapter),
                                                    str(work / "out-peft"), args.shard_size],
    }
    results = {}
    for name, cmd in runs.items():
        for d in ("out-stream", "out-verify", "out-peft"):
            shutil.rmtree(work / d, ignore_errors=True)
        results[name] = peak_rss_mb(cmd)
    base_mb = results["baseline (imports only)"][0]
    peft_mb = results["peft merge_and_unload + save_pretrained"][0]
    print(f"{'run':42s} {'peak RSS MB':>12s} {'above baseline':>15s} {'in shards':>10s} {'vs peft':>8s} {'wall s':>7s}")
    for name, (mb, wall) in results.items():
        above = mb - base_mb
        print(f"{name:42s} {mb:12.0f} {above:15.0f} {above / largest:10.2f} {mb / peft_mb:8.2f} {wall:7.1f}")
    stream = results["sftdist merge-adapter --no-verify"][0]
    print(f"ratio streaming/peft: {stream / peft_mb:.2f} total, {(stream - base_mb) / (peft_mb - base_mb):.2f} above baseline")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
