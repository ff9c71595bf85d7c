"""SFT throughput, A/B/C in one invocation: the tutorial's trl run (A), trl's packing defaults (B), `sftdist train` (C).

All runs train the same locally built Llama-shaped model (GPT-2 tokenizer) on the same dolly rows for one epoch,
each in its own subprocess, in alternating order (A B C A B C ...), and are scored on the same held-out rows by
one evaluator (so a run's own tokenization or loss bookkeeping cannot flatter it). Reported ratios are medians of
the per-repetition ratios, which cancels most of the drift of a machine shared with other work.

    python bench/sft_bench.py --data path/to/dolly.jsonl   # the full benchmark (bench/README.md: 5,000 dolly rows)
    python bench/sft_bench.py --rows 300 --reps 1   # a quick look on the 300 rows of tests/fixtures/dolly-300
    python bench/sft_bench.py --smoke               # the smallest run: does every step still work (tests/test_bench.py)

Extra runs (`--runs A,B,C,C-trl-head,...`) are ablations of C, used to say what each change bought: they run
`sftdist train` with one change undone (see VARIANTS).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "gpt2-tiny-random"
# Dolly rows (--data, passed to the children through the environment). The default is the project's own 300 rows;
# bench/README.md says which rows its figures come from.
DATA_ENV = "SFTDIST_BENCH_DATA"
DOLLY = Path(os.environ.get(DATA_ENV, ROOT / "tests" / "fixtures" / "dolly-300" / "train.jsonl"))

# Llama blocks with the GPT-2 vocabulary (50,257): 29.9M parameters, of which the untied output layer holds 12.9M
# and does ~75% of the per-token matrix work.
MODEL_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
# --smoke: the same layout, small enough that the whole invocation checks the code paths in seconds.
SMOKE_SHAPE = {**MODEL_SHAPE, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 2}
SMOKE = {"rows": 4, "eval_rows": 2, "reps": 1, "prep_reps": 1, "help_reps": 1}

# The tutorial's settings (A); B changes only `packing`. Precision is not among them: see `bf16()`.
TUTORIAL = {
    "max_length": 512,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 4,
}

# Ablations of C: `sftdist train` with one of our changes undone, to measure what it buys.
VARIANTS = {
    "C": [],
    "C-trl-head": ["--no-fast-head"],  # trl's fused head forward: every position scored, attention over the flat batch
    "C-flat": ["--flat"],  # our head, but the backbone attends over the flat padding-free batch as trl gives it
    "C-gc": ["--set", "train.gradient_checkpointing=true"],  # trl's default activation checkpointing
    "C-batch8": ["--set", "train.per_device_train_batch_size=8"],  # the default batch (trl's): 8 packs per step
}

ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "PYTHONWARNINGS": "ignore",
}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def bf16() -> bool:
    """The precision of every run, A, B and C alike: bf16 autocast on a GPU that has it (trl's default there,
    and what sftdist's recipes use), fp32 otherwise (CPU). Left to each run's defaults, A would train in fp32
    and C in bf16 on a GPU, and the comparison would measure precision."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _render(row: dict[str, Any]) -> tuple[str, str]:
    """The tutorial's `### Instruction/Context/Response` prompt (the same text sftdist's `default` template gives)."""
    from sftdist.data.templates import PROMPT_TEMPLATES

    return PROMPT_TEMPLATES["default"].render(row["instruction"], row.get("context", "")), row["response"]


# ---------------------------------------------------------------------------------------------- children (one job each)

TRAIN_TIME: dict[str, float] = {}


def _time_train() -> None:
    """Time `Trainer.train` (wall and this process's CPU seconds) the same way in every run, whoever calls it.

    CPU seconds are the noise-robust cross-check: on a machine shared with other jobs the wall time of a run
    stretches with their load, while the work it does (its CPU time) moves much less."""
    from transformers import Trainer

    original = Trainer.train

    def train(self, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = original(self, *args, **kwargs)
        TRAIN_TIME.update(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)
        return result

    Trainer.train = train


def child_setup(work: Path, rows: int, eval_rows: int, lr: float, seed: int, shape: dict[str, Any]) -> None:
    """Model (seeded, safetensors), the train/held-out subsets and C's recipe, written once into `work`."""
    import torch
    import yaml
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    model_dir = work / "model"
    if not (model_dir / "model.safetensors").is_file():
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape
        )
        model = LlamaForCausalLM(cfg)
        model.save_pretrained(model_dir, safe_serialization=True)
        tok.save_pretrained(model_dir)

    # Rows whose tokenized prompt + response + EOS fit max_length: A truncates longer rows and sftdist drops them,
    # so only fitting rows give every run exactly the same samples. Held-out rows from the end (chosen first, so that
    # a small file keeps them), train rows from the top.
    def fits(row: dict[str, Any]) -> bool:
        if not str(row.get("response", "")).strip():
            return False
        prompt, completion = _render(row)
        n = len(tok(prompt)["input_ids"]) + len(tok(completion)["input_ids"]) + 1
        return n <= TUTORIAL["max_length"]

    all_rows = _read_jsonl(DOLLY)
    held_at: list[int] = []
    for i in range(len(all_rows) - 1, -1, -1):
        if len(held_at) == eval_rows:
            break
        if fits(all_rows[i]):
            held_at.append(i)
    held = [all_rows[i] for i in held_at]
    train: list[dict[str, Any]] = []
    for row in all_rows[: min(held_at, default=len(all_rows))]:
        if len(train) == rows:
            break
        if fits(row):
            train.append(row)
    _write_jsonl(work / "train.jsonl", train)
    _write_jsonl(work / "heldout.jsonl", held)

    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": [{"path": str(work / "train.jsonl"), "format": "dolly"}],
            "max_length": TUTORIAL["max_length"],
        },
        # A pack of 512 tokens holds ~3.5 of these samples: 2 per step give an optimizer step ~7 samples, like A's
        # 2 x 4 = 8, so both make about as many updates in the epoch (trl's default of 8 packs makes 3.5x fewer).
        "train": {"learning_rate": lr, "num_train_epochs": 1, "seed": seed, "per_device_train_batch_size": 2,
                  "bf16": bf16()},
        "output_dir": str(work / "runs" / "C" / "output"),
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


def child_trl(work: Path, out: Path, packing: bool, lr: float, seed: int) -> None:
    """A (packing=False) or B (packing=True): trl's SFTTrainer as the tutorial uses it, training into `out/output`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = _read_jsonl(work / "train.jsonl")
    data = Dataset.from_list([dict(zip(("prompt", "completion"), _render(r))) for r in rows])
    tok = AutoTokenizer.from_pretrained(TOKENIZER)  # no pad token: trl falls back to pad = eos, as in the tutorial
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    args = SFTConfig(
        output_dir=str(out / "output"),
        packing=packing,
        learning_rate=lr,
        num_train_epochs=1,
        seed=seed,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        include_num_input_tokens_seen="all",  # counts padding too: slots, for the padding share
        bf16=bf16(),
        **TUTORIAL,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    _time_train()
    result = trainer.train()
    trainer.save_model(str(out / "output" / "final"))
    ds = trainer.train_dataset
    real = sum(sum(x) for x in ds["seq_lengths"]) if "seq_lengths" in ds.column_names else sum(map(len, ds["input_ids"]))
    info = {
        "samples": len(rows),
        "train_seconds": TRAIN_TIME["wall"],
        "train_cpu_seconds": TRAIN_TIME["cpu"],
        "steps": trainer.state.global_step,
        "real_tokens": real,
        "slots": trainer.state.num_input_tokens_seen,
        "train_loss": result.metrics["train_loss"],
        "gradient_checkpointing": args.gradient_checkpointing,
        "bf16": args.bf16,
    }
    (out / "bench.json").write_text(json.dumps(info), encoding="utf-8")


def child_sftdist(work: Path, out: Path, extra: list[str]) -> None:
    """C and its ablations: the real `sftdist train` command, in this process (so its peak RSS is this process's),
    with `out/output` as its output_dir: a new directory, as a user's first run has (the bench's own files stay
    in `out`, outside the run)."""
    from sftdist.cli import main

    import sftdist.fast_head as fast_head

    if "--no-fast-head" in extra:  # ablation: leave trl's fused head in place
        fast_head.install = lambda trainer: False
    if "--flat" in extra:  # ablation: one row for the whole padding-free batch, as trl's collator makes it
        fast_head.row_spans = lambda position_ids, row_length: [(0, position_ids.shape[1])]
    extra = [a for a in extra if a not in ("--no-fast-head", "--flat")]
    run_dir = out / "output"
    sys.argv = ["sftdist", "train", str(work / "recipe.yaml"), "--set", f"output_dir={run_dir}", *extra]
    _time_train()
    try:
        main()
    except SystemExit as e:
        if e.code:
            raise
    run = json.loads((run_dir / "sftdist_run.json").read_text(encoding="utf-8"))
    state = json.loads((run_dir / "trainer_state.json").read_text(encoding="utf-8"))
    slots = max((h["num_tokens"] for h in state["log_history"] if "num_tokens" in h), default=0)
    info = {
        "samples": len(_read_jsonl(work / "train.jsonl")),
        "train_seconds": TRAIN_TIME["wall"],
        "train_cpu_seconds": TRAIN_TIME["cpu"],
        "steps": state["global_step"],
        "real_tokens": state["num_input_tokens_seen"],  # sftdist counts non-padding tokens (pad != eos)
        "slots": slots,  # trl's count: every position of each (padding-free) batch
        "train_loss": run["metrics"]["train_loss"],
        "gradient_checkpointing": "train.gradient_checkpointing=true" in extra,
        "bf16": bf16(),
    }
    (out / "bench.json").write_text(json.dumps(info), encoding="utf-8")


def child_eval(work: Path, model_dir: Path, out: Path) -> None:
    """Mean NLL per completion token (response + EOS) of the held-out rows, each row alone (no padding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in _read_jsonl(work / "heldout.jsonl"):
            prompt, completion = _render(row)
            p = tok(prompt)["input_ids"]
            c = tok(completion)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([p + c])
            logits = model(input_ids=ids, use_cache=False).logits[0, len(p) - 1 : -1].float()
            total += torch.nn.functional.cross_entropy(logits, ids[0, len(p) :], reduction="sum").item()
            count += len(c)
    out.write_text(json.dumps({"eval_loss": total / count, "eval_tokens": count}), encoding="utf-8")


def child_prep(which: str, out: Path, max_length: int) -> None:
    """Tokenize + pack every row of the data (5,000 dolly rows in bench/README.md), timed after imports and
    tokenizer loading."""
    import datasets

    datasets.disable_caching()  # a cached `map` would time a cache read on the second repetition
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    args = SFTConfig(output_dir=str(out.parent / "prep_tmp"), max_length=max_length, packing=True, bf16=False,
                     report_to="none")
    # `_prepare_dataset` reads only these attributes of the trainer; calling it unbound times trl's preparation alone.
    fake = argparse.Namespace(_tokenizer=tok, completion_only_loss=True, chat_template=None)
    start = time.perf_counter()
    if which == "trl":
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        rows = _read_jsonl(DOLLY)
        data = datasets.Dataset.from_list([dict(zip(("prompt", "completion"), _render(r))) for r in rows])
        packed = SFTTrainer._prepare_dataset(fake, data, tok, args, True, None, "train")
    else:  # sftdist's cache build: read, render, encode and pack (trl's packer) into a new entry
        from sftdist.data.pipeline import build
        from sftdist.model import load_tokenizer
        from sftdist.recipe import recipe_from_dict

        recipe = recipe_from_dict(
            {"model": {"name_or_path": str(TOKENIZER)}, "data": {"train": [{"path": str(DOLLY)}],
                                                               "max_length": max_length, "truncate": True}}
        )
        tok = load_tokenizer(recipe)
        entry = Path(tempfile.mkdtemp(dir=out.parent))
        start = time.perf_counter()
        packed = range(build(recipe, tok, entry, progress=False).train_rows)
    seconds = time.perf_counter() - start
    out.write_text(json.dumps({"seconds": seconds, "packs": len(packed)}), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- the parent


def _spawn(args: list[str], log: Path) -> tuple[int, float, float]:
    """Run a child; return its exit code, wall seconds and peak RSS in MiB (its own, from wait4)."""
    env = {**os.environ, **ENV}
    start = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - start
    return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss / 1024


def _me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _check(rc: int, what: str, log: Path) -> None:
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        sys.exit(f"{what} failed (exit {rc}); last lines of {log}:\n" + "\n".join(tail))


def train_one(work: Path, name: str, rep: int, opts: argparse.Namespace) -> dict[str, Any]:
    """One training run and its evaluation. `out` holds the bench's records (logs, timings, eval); the run trains
    into `out/output`, which no bench file enters: sftdist refuses an output_dir holding files it did not write."""
    out = work / "runs" / f"{name}-{rep}"
    if opts.reuse and (out / "result.json").is_file():  # an interrupted invocation's finished run
        info = json.loads((out / "result.json").read_text(encoding="utf-8"))
        print(f"  {name} rep {rep}: reused {out / 'result.json'}", flush=True)
        return info
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out / "log.txt"
    common = ["--work", str(work), "--out", str(out), "--lr", str(opts.lr), "--seed", str(opts.seed)]
    if name in ("A", "B"):
        cmd = _me("--child", name, *common)
    else:
        cmd = _me("--child", "C", *common, "--", *VARIANTS[name])
    rc, wall, rss = _spawn(cmd, log)
    _check(rc, f"run {name} (rep {rep})", log)
    info = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    rc, _, _ = _spawn(_me("--child", "eval", "--work", str(work), "--model", str(out / "output" / "final"),
                          "--out", str(out / "eval.json")), out / "eval_log.txt")
    _check(rc, f"eval of {name} (rep {rep})", out / "eval_log.txt")
    info.update(json.loads((out / "eval.json").read_text(encoding="utf-8")))
    info.update(name=name, rep=rep, process_seconds=wall, peak_rss_mib=rss, bf16=info.get("bf16", False))
    info["samples_per_s"] = info["samples"] / info["train_seconds"]
    info["samples_per_cpu_s"] = info["samples"] / info["train_cpu_seconds"]
    info["tokens_per_s"] = info["real_tokens"] / info["train_seconds"]
    info["padding_share"] = 1 - info["real_tokens"] / info["slots"] if info["slots"] else 0.0
    print(f"  {name} rep {rep}: {info['samples_per_s']:.2f} samples/s ({info['samples_per_cpu_s']:.2f} per CPU-s), "
          f"{info['tokens_per_s']:.0f} tok/s, "
          f"padding {info['padding_share']:.1%}, eval loss {info['eval_loss']:.4f}, rss {rss:.0f} MiB, "
          f"{info['steps']} steps, train {info['train_seconds']:.0f} s", flush=True)
    if not opts.keep:
        shutil.rmtree(out / "output" / "final", ignore_errors=True)
    (out / "result.json").write_text(json.dumps(info), encoding="utf-8")
    return info


def bench_prep(work: Path, reps: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"trl": [], "sftdist": []}
    packs: dict[str, int] = {}
    for rep in range(reps):
        for which in ("trl", "sftdist"):
            out = work / f"prep-{which}.json"
            rc, _, _ = _spawn(_me("--child", f"prep-{which}", "--work", str(work), "--out", str(out)),
                              work / f"prep-{which}.log")
            _check(rc, f"data preparation ({which})", work / f"prep-{which}.log")
            r = json.loads(out.read_text(encoding="utf-8"))
            times[which].append(r["seconds"])
            packs[which] = r["packs"]
            print(f"  prep {which} rep {rep}: {r['seconds']:.2f} s, {r['packs']} packs", flush=True)
    ratios = [t / s for t, s in zip(times["trl"], times["sftdist"])]
    return {"trl_s": statistics.median(times["trl"]), "sftdist_s": statistics.median(times["sftdist"]),
            "speedup": statistics.median(ratios), "packs": packs}


def bench_help(reps: int) -> dict[str, float]:
    exe = Path(sys.executable).with_name("sftdist")
    times, bare = [], []
    for _ in range(reps):
        for cmd, acc in (([str(exe), "--help"], times), ([sys.executable, "-c", "pass"], bare)):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **ENV})
            acc.append(time.perf_counter() - start)
    return {"help_s": statistics.median(times), "python_s": statistics.median(bare)}


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _ratio(num: list[dict[str, Any]], den: list[dict[str, Any]], key: str) -> tuple[float, list[float]]:
    """Median of the per-repetition ratios (each pair ran back to back, under about the same load)."""
    ratios = [x[key] / y[key] for x, y in zip(num, den)]
    return statistics.median(ratios), ratios


def report(results: list[dict[str, Any]], names: list[str], prep: dict | None, help_t: dict | None,
           opts: argparse.Namespace, size: int, shape: dict[str, Any]) -> str:
    by = {n: [r for r in results if r["name"] == n] for n in names}
    first = by[names[0]][0]
    held = len(_read_jsonl(opts.work / "heldout.jsonl"))
    lines = [
        f"Model: Llama, {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
        f"{size:,} parameters (GPT-2 vocabulary). Data: {first['samples']} dolly rows for one epoch, eval loss on "
        f"{held} held-out rows; lr {opts.lr}; {'bf16 autocast' if first['bf16'] else 'fp32'} for every run; "
        f"{opts.reps} alternating repetitions (medians shown).",
        "",
        "| run | samples/s | samples/CPU-s | real tokens/s | padding share | peak RSS MiB | optimizer steps | eval loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in names:
        rs = by[n]
        lines.append(
            f"| {n} | {_median(rs, 'samples_per_s'):.2f} | {_median(rs, 'samples_per_cpu_s'):.2f} | "
            f"{_median(rs, 'tokens_per_s'):.0f} | {_median(rs, 'padding_share'):.1%} | "
            f"{_median(rs, 'peak_rss_mib'):.0f} | {rs[0]['steps']} | {_median(rs, 'eval_loss'):.4f} |"
        )
    lines.append("")
    pairs = [(n, b) for n in names if n not in ("A", "B") for b in ("A", "B") if b in by]
    pairs += [("C", n) for n in names if n.startswith("C-") and "C" in by]  # what undoing one change costs
    for num, den in pairs:
        wall, each = _ratio(by[num], by[den], "samples_per_s")
        cpu, _ = _ratio(by[num], by[den], "samples_per_cpu_s")
        lines.append(f"- {num}/{den} samples/s: **{wall:.2f}x** (per repetition {', '.join(f'{x:.2f}' for x in each)}; "
                     f"per CPU-second {cpu:.2f}x)")
    if prep:
        n = sum(1 for line in opts.data.open(encoding="utf-8") if line.strip())
        lines.append(f"- data preparation, tokenize + pack the {n:,} dolly rows (median of {opts.prep_reps}): trl "
                     f"`_prepare_dataset` {prep['trl_s']:.1f} s, sftdist pipeline + trl packing {prep['sftdist_s']:.1f} s: "
                     f"**{prep['speedup']:.2f}x** ({prep['packs']['trl']} and {prep['packs']['sftdist']} packs of "
                     f"{TUTORIAL['max_length']} tokens)")
    if help_t:
        lines.append(f"- `sftdist --help`: {help_t['help_s']:.2f} s (median of {opts.help_reps}; bare "
                     f"`python -c pass`: {help_t['python_s']:.2f} s)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000, help="train rows (default 1000)")
    ap.add_argument("--eval-rows", type=int, default=100, help="held-out rows (default 100)")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions (default 3)")
    ap.add_argument("--runs", default="A,B,C", help=f"comma-separated, among A, B, {', '.join(VARIANTS)}")
    ap.add_argument("--data", type=Path, default=DOLLY, help=f"dolly-format jsonl (default {DOLLY})")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--prep-reps", type=int, default=3, help="data-preparation repetitions (0: skip)")
    ap.add_argument("--help-reps", type=int, default=5, help="`sftdist --help` repetitions (0: skip)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sftdist-bench",
                    help="scratch folder (default: $TMPDIR/sftdist-bench)")
    ap.add_argument("--keep", action="store_true", help="keep each run's final model")
    ap.add_argument("--reuse", action="store_true", help="reuse the finished runs of an interrupted invocation")
    ap.add_argument("--smoke", action="store_true",
                    help="the smallest invocation (a 1-layer model, 4 rows, one of everything): checks that it runs")
    # children
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    os.environ[DATA_ENV] = str(opts.data.resolve())
    if opts.smoke:
        vars(opts).update(SMOKE)

    if opts.child:
        os.environ.update(ENV)
        from sftdist.quiet import silence_libraries

        silence_libraries()  # the libraries' notes (bitsandbytes' missing `kernels`, ...), as sftdist's commands do
        {
            "setup": lambda: child_setup(opts.work, opts.rows, opts.eval_rows, opts.lr, opts.seed,
                                         SMOKE_SHAPE if opts.smoke else MODEL_SHAPE),
            "A": lambda: child_trl(opts.work, opts.out, False, opts.lr, opts.seed),
            "B": lambda: child_trl(opts.work, opts.out, True, opts.lr, opts.seed),
            "C": lambda: child_sftdist(opts.work, opts.out, opts.extra),
            "eval": lambda: child_eval(opts.work, opts.model, opts.out),
            "prep-trl": lambda: child_prep("trl", opts.out, TUTORIAL["max_length"]),
            "prep-sftdist": lambda: child_prep("sftdist", opts.out, TUTORIAL["max_length"]),
        }[opts.child]()
        return

    names = [n.strip() for n in opts.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in ("A", "B", *VARIANTS)]
    if unknown:
        ap.error(f"unknown run {unknown[0]!r}; expected A, B or one of {', '.join(VARIANTS)}")
    work = opts.work.resolve()
    opts.work = work
    work.mkdir(parents=True, exist_ok=True)
    if not opts.reuse:  # an earlier invocation's model may have another shape (--smoke)
        shutil.rmtree(work / "model", ignore_errors=True)
    print(f"bench: setting up {work} (load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs)", flush=True)
    rc, _, _ = _spawn(_me("--child", "setup", "--work", str(work), "--rows", str(opts.rows), "--eval-rows",
                          str(opts.eval_rows), "--lr", str(opts.lr), "--seed", str(opts.seed),
                          *(["--smoke"] if opts.smoke else [])), work / "setup.log")
    _check(rc, "setup", work / "setup.log")
    train_rows, held_rows = (len(_read_jsonl(work / f)) for f in ("train.jsonl", "heldout.jsonl"))
    print(f"bench: {train_rows} train rows (of {opts.rows} asked) and {held_rows} held-out rows (of {opts.eval_rows}) "
          f"of {opts.data} fit {TUTORIAL['max_length']} tokens", flush=True)
    from safetensors import safe_open

    with safe_open(str(work / "model" / "model.safetensors"), "np") as f:
        size = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())

    started = time.time()
    results = []
    for rep in range(opts.reps):
        for name in names:
            results.append(train_one(work, name, rep, opts))
    prep = bench_prep(work, opts.prep_reps) if opts.prep_reps else None
    help_t = bench_help(opts.help_reps) if opts.help_reps else None
    shape = json.loads((work / "model" / "config.json").read_text(encoding="utf-8"))
    text = report(results, names, prep, help_t, opts, size, shape)
    loads = os.getloadavg()
    text += (f"\n- conditions: {os.cpu_count()} CPUs, load average at the end {loads[0]:.1f} / {loads[2]:.1f} "
             f"(1 / 15 min), {(time.time() - started) / 60:.0f} min in all")
    print("\n" + text)
    (work / "results.json").write_text(json.dumps({"runs": results, "prep": prep, "help": help_t}, indent=1))
    (work / "report.md").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
