"""Data preparation at scale: sftdist's cache (`sftdist prepare`) against trl's own preparation.

For each row count, in one invocation (ratios, since this machine is noisy):
- trl: `SFTTrainer._prepare_dataset` (prompt/completion rows already in memory, one process,
  packing bfd) - the work every rank of a launch did on every start before the cache;
- sftdist cold: the build of a cache entry (read + render + encode + pack + write), in process,
  after imports and tokenizer loading; and the whole `sftdist prepare` command;
- sftdist warm: `sftdist prepare` again (a cache hit), the whole command;
then, for the largest count, the peak RSS of each rank of a 2-process `sftdist launch` (ddp, 2
steps) that reads the warm entry.

  python bench/data_bench.py --data path/to/dolly.jsonl --rows 100000,200000   # bench/README.md: 5,000 dolly rows
  python bench/data_bench.py --rows 300 --no-launch                             # the smallest (tests/test_bench.py)

The rows are the data file's dolly rows repeated to the count, rendered with the default prompt
template into prompt/completion, so trl and sftdist tokenize the same text with the same tokenizer
(the real GPT-2 BPE of tests/fixtures/gpt2-tiny-random).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "fixtures" / "gpt2-tiny-random"
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}


def _rows(data: Path, n: int, out: Path) -> None:
    from sftdist.data.formats import render_row

    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    with out.open("w", encoding="utf-8") as f:
        for i in range(n):
            ex = render_row(rows[i % len(rows)], "dolly", "default", "bench")
            if ex is not None:
                f.write(json.dumps({"prompt": ex.prompt, "completion": ex.completion}) + "\n")


def _recipe(work: Path, data: Path, max_length: int) -> Path:
    import yaml

    path = work / f"{data.stem}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(MODEL)},
        "data": {"train": [{"path": str(data)}], "max_length": max_length, "cache_dir": str(work / "cache")},
        "train": {"max_steps": 2, "per_device_train_batch_size": 2, "report_to": [], "save_steps": 1000},
        "output_dir": str(work / f"run-{data.stem}"),
    }))
    return path


# ---------------------------------------------------------------------------------------------- children


def child_trl(data: Path, out: Path, max_length: int) -> None:
    import datasets

    datasets.disable_caching()
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(MODEL)
    tok.pad_token = tok.pad_token or tok.eos_token
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    ds = datasets.Dataset.from_list(rows)
    del rows
    args = SFTConfig(output_dir=str(out.parent / "trl_tmp"), max_length=max_length, packing=True, bf16=False,
                     report_to="none")
    # `_prepare_dataset` reads only these attributes of the trainer; calling it unbound times trl's preparation alone.
    fake = argparse.Namespace(_tokenizer=tok, completion_only_loss=True, chat_template=None)
    start = time.perf_counter()
    packed = SFTTrainer._prepare_dataset(fake, ds, tok, args, True, None, "train")
    out.write_text(json.dumps({"seconds": time.perf_counter() - start, "rows": len(packed)}))


def child_build(recipe_path: Path, out: Path) -> None:
    from sftdist.data.pipeline import build
    from sftdist.model import load_tokenizer
    from sftdist.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    tok = load_tokenizer(recipe)
    target = Path(tempfile.mkdtemp(dir=out.parent))
    start = time.perf_counter()
    report = build(recipe, tok, target, progress=False)
    out.write_text(json.dumps({"seconds": time.perf_counter() - start, "rows": report.train_rows}))


# ---------------------------------------------------------------------------------------------- parent


def _peak_rss(cmd: list[str], log: Path) -> tuple[int, float, dict[int, float], dict[int, str]]:
    """Run cmd; return exit code, wall seconds, and the peak RSS (MiB) of it and each descendant."""
    import psutil

    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **ENV}, cwd=ROOT)
    peaks: dict[int, float] = {}
    names: dict[int, str] = {}
    root = psutil.Process(proc.pid)

    def sample() -> None:
        while proc.poll() is None:
            try:
                for p in [root, *root.children(recursive=True)]:
                    rss = p.memory_info().rss / 2**20
                    if rss > peaks.get(p.pid, 0):
                        peaks[p.pid] = rss
                        names[p.pid] = " ".join(p.cmdline())[:200]
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=sample)
    t.start()
    proc.wait()
    t.join()
    return proc.returncode, time.perf_counter() - start, peaks, names


def _run(cmd: list[str], log: Path, what: str) -> tuple[float, float]:
    rc, wall, peaks, _ = _peak_rss(cmd, log)
    if rc != 0:
        sys.exit(f"{what} failed (exit {rc}); see {log}")
    return wall, max(peaks.values())


def _child(work: Path, name: str, *args: str) -> tuple[dict[str, Any], float]:
    out = work / f"{name}.json"
    _, rss = _run([sys.executable, __file__, "--child", name, "--out", str(out), *args], work / f"{name}.log", name)
    return json.loads(out.read_text()), rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "tests" / "fixtures" / "dolly-300" / "train.jsonl",
                    help="dolly rows to repeat (default: the project's 300 in tests/fixtures/dolly-300)")
    ap.add_argument("--rows", default="100000,200000", help="comma-separated row counts")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sftdist-data-bench")
    ap.add_argument("--no-launch", action="store_true", help="skip the 2-process launch")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child == "trl":
        return child_trl(Path(opts.extra[0]), opts.out, int(opts.extra[1]))
    if opts.child == "build":
        return child_build(Path(opts.extra[0]), opts.out)

    import shutil

    shutil.rmtree(opts.work, ignore_errors=True)
    opts.work.mkdir(parents=True)
    sftdist = [sys.executable, "-m", "sftdist"]
    lines = []
    for n in (int(x) for x in opts.rows.split(",")):
        data = opts.work / f"rows-{n}.jsonl"
        _rows(opts.data, n, data)
        recipe = _recipe(opts.work, data, opts.max_length)
        trl, trl_rss = _child(opts.work, "trl", str(data), str(opts.max_length))
        build, build_rss = _child(opts.work, "build", str(recipe))
        cold, cold_rss = _run([*sftdist, "prepare", str(recipe)], opts.work / f"cold-{n}.log", "cold prepare")
        warm, warm_rss = _run([*sftdist, "prepare", str(recipe)], opts.work / f"warm-{n}.log", "warm prepare")
        assert "data cache hit" in (opts.work / f"warm-{n}.log").read_text()
        lines.append(
            f"| {n:,} | {trl['seconds']:.1f} s ({n / trl['seconds']:,.0f} rows/s), {trl_rss:,.0f} MiB "
            f"| {build['seconds']:.1f} s ({n / build['seconds']:,.0f} rows/s), {build_rss:,.0f} MiB "
            f"| **{trl['seconds'] / build['seconds']:.2f}x** | {cold:.1f} s, {cold_rss:,.0f} MiB "
            f"| {warm:.2f} s, {warm_rss:,.0f} MiB | **{warm / cold:.1%}** |"
        )
        print(lines[-1], flush=True)
    print("| rows | trl `_prepare_dataset` | sftdist build (cold, in process) | trl / sftdist "
          "| `sftdist prepare` cold | `sftdist prepare` warm | warm / cold |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    if not opts.no_launch:
        cmd = [*sftdist, "launch", str(recipe), "--strategy", "ddp", "--num-processes", "2", "--overwrite"]
        rc, wall, peaks, names = _peak_rss(cmd, opts.work / "launch.log")
        if rc != 0:
            sys.exit(f"launch failed (exit {rc}); see {opts.work / 'launch.log'}")
        ranks = sorted(rss for pid, rss in peaks.items() if " train " in f" {names[pid]} " and "launch" not in names[pid])
        print(f"2-process ddp launch on the warm {n:,}-row entry: per-rank peak RSS "
              f"{', '.join(f'{r:,.0f}' for r in ranks)} MiB ({wall:.0f} s); "
              f"the largest is {max(ranks) / 2480:.2f}x the 2.6 GB (2,480 MiB) single-process `sftdist data` of the issue, "
              f"{max(ranks) / trl_rss:.2f}x this invocation's trl preparation process")


if __name__ == "__main__":
    main()
