"""What identifying a data source by its content costs (resume and the data cache, sftdist/data/cache.py):
the sha256 of a file of --mb MiB on a cold start, the memoised digest on a warm start, and again after a
`touch`, each against reading the same file without hashing, in the same invocation.

    .venv/bin/python bench/digest_cost.py --mb 1024 --work /tmp/digest
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from sftdist.data.cache import _blocks, _remember_digests, content_digest


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=1024, help="size of the data file, MiB")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sftdist-digest-bench"))
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    data, memo = args.work / "train.jsonl", args.work / "cache"
    row = b'{"instruction": "Say something.", "response": "' + os.urandom(48).hex().encode() + b'"}\n'
    with data.open("wb") as f:
        for _ in range(args.mb * (1 << 20) // len(row)):
            f.write(row)

    def read() -> None:
        for _ in _blocks(data):
            pass

    read()  # the file in the page cache for every measurement: what is compared is the hashing
    rows = [("read without hashing (baseline)", timed(read))]
    rows.append(("cold start: sha256", timed(lambda: content_digest(data, memo))))
    _remember_digests()  # written under the cache directory, as a command that found or built its entry does
    rows.append(("warm start: memoised", timed(lambda: content_digest(data, memo))))
    os.utime(data)
    rows.append(("after `touch`: sha256 again", timed(lambda: content_digest(data, memo))))
    size = data.stat().st_size
    print(f"Data file: {size / (1 << 20):,.0f} MiB\n")
    print("| step | seconds | MiB/s | / baseline |\n|---|---|---|---|")
    base = rows[0][1]
    for name, secs in rows:
        print(f"| {name} | {secs:.6f} | {size / (1 << 20) / secs:,.0f} | {secs / base:.2f}x |")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
