"""Every bench script still runs: each one's smallest invocation must finish and print its table with the
expected fields and sane values, so that none can rot unseen between the runs bench/README.md reports.

Timings are not asserted (they are measured in bench/, as ratios). The scripts start together: each spends
most of its time importing libraries in one process after another, so on two cores the module takes about
half the CPU time of all of them, rather than the sum of their wall times.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

NUMBER = r"([0-9][0-9,]*\.?[0-9]*)"


def _invocations(tmp: Path) -> dict[str, list[str]]:
    """The smallest invocation of each script (data_bench without its 2-process launch, see test_data_bench)."""
    return {
        "sft_bench": ["bench/sft_bench.py", "--smoke", "--work", str(tmp / "sft")],
        "data_bench": ["bench/data_bench.py", "--rows", "300", "--no-launch", "--work", str(tmp / "data")],
        "merge_memory": ["bench/merge_memory.py", "--smoke", "--workdir", str(tmp / "merge")],
        "sp_memory": ["bench/sp_memory.py", "--tokens", "64", "--sp", "2"],
        "sp_packing": ["bench/sp_packing.py", "--samples", "4", "--min-tokens", "32", "--max-length", "128"],
        "resume_cost": ["bench/resume_cost.py", "--hidden", "64", "--layers", "2", "--strategies", "zero2"],
        "digest_cost": ["bench/digest_cost.py", "--mb", "4", "--work", str(tmp / "digest")],
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def runs(work: Path) -> Iterator[dict[str, tuple[subprocess.Popen, Path]]]:
    """All started at once; each test waits for its own. Any still running at the end is stopped."""
    started = {}
    for name, args in _invocations(work).items():
        log = work / f"{name}.log"
        with log.open("w") as f:
            proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
        started[name] = (proc, log)
    yield started
    for proc, _ in started.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def output(runs: dict[str, tuple[subprocess.Popen, Path]], name: str) -> str:
    proc, log = runs[name]
    rc = proc.wait(timeout=900)
    text = log.read_text(errors="replace")
    assert rc == 0, f"{name} exited {rc}:\n{text[-4000:]}"
    return text


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of the markdown table rows whose first cell matches `first_cell` (a regex)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and re.fullmatch(first_cell, cells[0]):
            rows.append(cells)
    return rows


def num(cell: str) -> float:
    match = re.search(NUMBER, cell)
    assert match, cell
    return float(match.group(1).replace(",", ""))


def test_sft_bench(runs: dict, work: Path) -> None:
    """A, B and C train and are scored; C trains into an output_dir of its own, which the bench never writes."""
    text = output(runs, "sft_bench")
    rows = {r[0]: r for r in table_rows(text, "A|B|C")}
    assert set(rows) == {"A", "B", "C"}, text
    for name, (_, sps, per_cpu, tok_s, padding, rss, steps, loss) in rows.items():
        assert num(sps) > 0 and num(per_cpu) > 0 and num(tok_s) > 0, rows[name]
        assert 100 < num(rss) < 20_000 and num(steps) >= 1, rows[name]
        # An untrained model over GPT-2's 50,257 tokens scores about ln(50257) = 10.8 per token.
        assert 5 < num(loss) < 13, rows[name]
    assert num(rows["A"][4]) > 0 and rows["B"][4] == rows["C"][4] == "0.0%"  # only A pads
    for pair in ("C/A", "C/B"):
        assert re.search(rf"^- {pair} samples/s: \*\*{NUMBER}x\*\* \(per repetition", text, re.M), text
    prep = re.search(rf"trl `_prepare_dataset` {NUMBER} s, sftdist pipeline \+ trl packing {NUMBER} s: "
                     rf"\*\*{NUMBER}x\*\* \({NUMBER} and {NUMBER} packs", text)  # fmt: skip
    assert prep and all(float(g) > 0 for g in prep.groups()), text
    assert re.search(rf"`sftdist --help`: {NUMBER} s", text), text
    # The children's logs (shown when one fails) hold no library notes, e.g. bitsandbytes' about `kernels`.
    logs = {str(p): p.read_text() for p in (work / "sft").rglob("*") if p.suffix in (".txt", ".log")} | {"out": text}
    assert not [name for name, log in logs.items() if "Failed to load" in log or "Traceback" in log], logs

    run = work / "sft" / "runs" / "C-0"
    assert json.loads((run / "output" / "sftdist_run.json").read_text())["metrics"]["train_loss"] > 0
    assert not {"log.txt", "bench.json", "eval.json"} & {p.name for p in (run / "output").iterdir()}
    assert (run / "log.txt").is_file() and (run / "result.json").is_file()


def test_data_bench(runs: dict) -> None:
    """trl's preparation, sftdist's build, a cold and a warm `sftdist prepare` (the script checks that the warm
    one is a cache hit). Its 2-process launch is left out (--no-launch): two more processes for ~15 s, on a
    path the launch tests cover."""
    text = output(runs, "data_bench")
    (row,) = {tuple(r) for r in table_rows(text, "300")}
    trl, build, speedup, cold, warm, share = row[1:]
    assert num(trl) > 0 and num(build) > 0 and num(speedup) > 0 and num(cold) > 0
    assert 0 < num(warm) < num(cold) and 0 < num(share) < 100, row


def test_merge_memory(runs: dict) -> None:
    """The baseline, both sftdist merges and peft's, each with its peak RSS."""
    text = output(runs, "merge_memory")
    names = ("baseline (imports only)", "sftdist merge-adapter --no-verify", "sftdist merge-adapter (verify on)",
             "peft merge_and_unload + save_pretrained")  # fmt: skip
    for name in names:
        line = next((line for line in text.splitlines() if line.startswith(name)), None)
        assert line, text
        peak, above, _, vs_peft, wall = (float(x) for x in line[len(name):].split())
        assert 100 < peak < 20_000 and abs(above) < peak and vs_peft > 0 and wall > 0, line
    match = re.search(rf"ratio streaming/peft: {NUMBER} total, -?{NUMBER} above baseline", text)
    assert match and 0 < float(match.group(1)) < 10, text


def test_sp_memory(runs: dict) -> None:
    """One process against two sharing the sample: each of the two holds half its tokens."""
    text = output(runs, "sp_memory")
    rows = {r[0]: r for r in table_rows(text, "sp [12]")}
    assert num(rows["sp 1"][1]) == 64 and num(rows["sp 2"][1]) == 32, text
    assert all(num(r[2]) > 0 and num(r[3]) > 0 for r in rows.values()), rows
    ratio = re.search(rf"sp 2 / sp 1, saved for backward per rank: \*\*{NUMBER}x\*\*", text)
    assert ratio and 0 < float(ratio.group(1)) < 1, text


def test_sp_packing(runs: dict) -> None:
    """Packed rows, unpacked samples and unpacked samples padded to max_length, each through the SP training path."""
    text = output(runs, "sp_packing")
    rows = {r[0]: r for r in table_rows(text, "packed|unpacked|unpacked-max-length")}
    assert set(rows) == {"packed", "unpacked", "unpacked-max-length"}, text
    for name, (_, batches, given, real, _, _, per_s, rss) in rows.items():
        assert num(batches) >= 1 and num(given) >= num(real) > 0 and num(per_s) > 0, rows[name]
    assert num(rows["unpacked-max-length"][2]) == 4 * 128  # four samples, each padded to max_length
    for pair in ("packed / unpacked", "packed / unpacked-max-length"):
        assert re.search(rf"^- {pair}: real tokens/s \*\*{NUMBER}x\*\*", text, re.M), text


def test_resume_cost(runs: dict) -> None:
    """A 2-process ZeRO-2 run saves checkpoint-2; resumed on one process, it converts it to universal once."""
    text = output(runs, "resume_cost")
    ((_, save, convert, _),) = table_rows(text, "zero2")
    assert num(save) >= 0 and num(convert) > 0, text


def test_digest_cost(runs: dict) -> None:
    """The baseline read, a cold sha256, the memoised warm start and the rehash after a touch, in that order."""
    text = output(runs, "digest_cost")
    size = re.search(rf"^Data file: {NUMBER} MiB", text, re.M)
    assert size and float(size.group(1)) == 4, text
    rows = table_rows(text, "read without hashing \\(baseline\\)|cold start: sha256|warm start: memoised|"
                            "after `touch`: sha256 again")
    assert [r[0] for r in rows] == ["read without hashing (baseline)", "cold start: sha256", "warm start: memoised",
                                    "after `touch`: sha256 again"], text
    assert all(num(r[1]) >= 0 for r in rows) and num(rows[1][1]) > 0 and rows[0][3] == "1.00x", rows
