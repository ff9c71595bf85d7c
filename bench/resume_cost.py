"""What a resume at another number of processes costs: the ZeRO checkpoint's conversion to DeepSpeed's universal
format, against one checkpoint save of the same run, measured in the same invocation.

For each ZeRO stage, a 2-process `sftdist launch` trains a locally built Llama for 2 steps and saves checkpoint-2
(the run prints how long the save took); then the same recipe resumes on 1 process, which converts that checkpoint
once (it prints how long) and trains one more step. The figure is conversion time / save time.

    python bench/resume_cost.py                          # hidden 512, 8 layers (~30M parameters)
    python bench/resume_cost.py --hidden 64 --layers 2   # a quick look
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sftdist" / "demo" / "train.jsonl"


def sftdist(*args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "sftdist", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"sftdist {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def make_model(out: Path, hidden: int, layers: int) -> int:
    """The tiny model's tokenizer on a Llama of the asked width and depth; returns its parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tiny = out.parent / "tiny"
    sftdist("make-tiny-model", str(tiny), cwd=ROOT)
    config = AutoConfig.from_pretrained(tiny)
    config.update({"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
                   "num_attention_heads": max(1, hidden // 64), "num_key_value_heads": max(1, hidden // 64)})
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def seconds(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    if not m:
        raise SystemExit(f"no line matching {pattern!r} in:\n{text[-2000:]}")
    return float(m.group(1))


def measure(work: Path, model: Path, strategy: str) -> tuple[float, float]:
    """(checkpoint save seconds, universal conversion seconds) for `strategy`."""
    run = work / f"run-{strategy}"
    recipe = work / f"{strategy}.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model)},
        "data": {"train": [{"path": str(DATA), "limit": 200}], "max_length": 128},
        "global_batch_size": 4,
        "train": {"max_steps": 3, "save_steps": 2, "per_device_train_batch_size": 2, "report_to": [],
                  "learning_rate": 1e-4},
        "output_dir": str(run),
    }, sort_keys=False))
    first = sftdist("launch", str(recipe), "--strategy", strategy, "--num-processes", "2", cwd=ROOT)
    save = seconds(r"sftdist: checkpoint-2 written in ([\d.]+) s", first)
    for name in ("checkpoint-3", "final"):  # as if stopped right after checkpoint-2
        shutil.rmtree(run / name)
    for name in ("sftdist_run.json", "trainer_state.json"):
        (run / name).unlink()
    second = sftdist("launch", str(recipe), "--strategy", strategy, "--num-processes", "1", cwd=ROOT)
    convert = seconds(r"ZeRO checkpoint converted to universal in ([\d.]+) s", second)
    return save, convert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--strategies", default="zero2,zero3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="resume-cost-") as tmp:
        work = Path(tmp)
        params = make_model(work / "model", args.hidden, args.layers)
        print(f"model: Llama, hidden {args.hidden}, {args.layers} layers, {params:,} parameters; 2 processes, "
              "checkpoint-2 resumed on 1 process")
        print("| strategy | checkpoint save (s) | universal conversion (s) | conversion / save |")
        print("|---|---:|---:|---:|")
        for strategy in args.strategies.split(","):
            save, convert = measure(work, work / "model", strategy)
            # sftdist prints tenths of a second: a quick look's save can read 0.0 s, and then there is no ratio.
            ratio = f"{convert / save:.2f}x" if save else "n/a (save under 0.05 s)"
            print(f"| {strategy} | {save:.1f} | {convert:.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
