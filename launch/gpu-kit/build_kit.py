"""Build the GPU kit (`make gpu-kit [GPU_KIT=DIR] [BNB_CUDA=130]`): the wheels that a stock CUDA image
lacks to run sftdist, for Python 3.12 on x86_64 Linux, at most 40 MiB, with install.sh and gpu-check.sh.

The image we target has torch (CUDA 13), transformers, accelerate, peft, pyarrow, safetensors,
tokenizers, huggingface-hub, numpy, psutil, pyyaml, click and tensorboard, but no trl, datasets,
deepspeed or bitsandbytes, and no network. Steps:

1. deepspeed is published as a source archive only: its wheel is built here without ops
   (DS_BUILD_OPS=0; an op a run needs is compiled on the GPU machine when first used).
2. pip resolves, for the target (`install --dry-run --report`), the image's packages (`IMAGE`) and
   sftdist's dependencies (pyproject.toml) held to the image's versions where sftdist does not pin
   them. The kit gets, each without its own dependencies: sftdist's pinned packages, and every other
   package of sftdist's closure that the image's closure lacks or holds in another version (plus
   `BOUNDED`, small packages datasets bounds more tightly than the image's packages do). install.sh
   then lets pip, run against the real image, take from the kit only what that image needs.
3. bitsandbytes ships one library per CUDA version (41 MiB); only libbitsandbytes_cuda{BNB_CUDA}.so and
   the CPU one are kept.
4. requirements.txt (sftdist's dependencies; tensorboard unpinned: the image's serves the Trainer's
   logs) goes beside the wheels, with install.sh and gpu-check.sh; the size is checked.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LIMIT = 40 << 20
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--only-binary=:all:"] + [
    f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                                "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_12_x86_64",
                                "manylinux2010_x86_64", "linux_x86_64")
]  # fmt: skip
# The target image's packages (issue 18): torch 2.11 for CUDA 13 and what it brings, the rest at these versions.
IMAGE = ["torch", "triton==3.6.0", "transformers==5.17.0", "accelerate==1.15.0", "peft", "pyarrow", "safetensors==0.8.0",
         "tokenizers==0.23.2", "huggingface-hub==1.33.0", "numpy", "psutil", "pyyaml", "click", "tensorboard"]  # fmt: skip
NEVER = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")  # the image's own torch build is the one to use
BOUNDED = ("fsspec", "tqdm")  # datasets: fsspec<=2026.9.0, tqdm>=4.66.3; torch and the hub bound them less
UNPINNED = ("tensorboard",)  # the image's own serves the Trainer's report_to


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements() -> list[str]:
    """sftdist's dependencies as pyproject.toml pins them, with `UNPINNED` left to the image."""
    try:
        import tomllib
    except ModuleNotFoundError:
        sys.exit("build_kit: needs Python 3.11 or later (tomllib) to read pyproject.toml")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    out = []
    for dep in deps:
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0)
        out.append(name if canonical(name) in UNPINNED else dep)
    return out


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env={**os.environ, **(env or {})})


def build_deepspeed(version: str, out: Path) -> None:
    """deepspeed's wheel from its source archive, without ops; torch must be importable here (its setup imports it)."""
    pip("wheel", "--quiet", "--no-cache-dir", "--no-deps", "--no-build-isolation", "--no-binary", "deepspeed",
        f"deepspeed=={version}", "-w", str(out), env={"DS_BUILD_OPS": "0"})  # fmt: skip


def closure(reqs: list[str], scratch: Path, *options: str) -> dict[str, str]:
    """{name: version} of everything pip would install for `reqs` on the target."""
    report = scratch / "resolve.json"
    pip("install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report), "--target",
        str(scratch / "unused"), *TARGET, *options, *reqs)  # fmt: skip
    installs = json.loads(report.read_text(encoding="utf-8"))["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def _record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def strip_bitsandbytes(wheel: Path, cuda: str) -> None:
    """Rewrite the bitsandbytes wheel keeping only the CUDA `cuda` library (and the CPU one) of its native
    libraries, with a RECORD that matches (pip cannot leave files of a wheel out when installing it)."""
    keep = {f"libbitsandbytes_cuda{cuda}.so", "libbitsandbytes_cpu.so"}
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [n for n in src.namelist() if not (n.endswith(".so") and Path(n).name not in keep)]
        if not any(Path(n).name == f"libbitsandbytes_cuda{cuda}.so" for n in names):
            sys.exit(f"build_kit: {wheel.name} has no libbitsandbytes_cuda{cuda}.so (BNB_CUDA={cuda})")
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        rows = []
        for name in names:
            if name != record:
                data = src.read(name)
                dst.writestr(src.getinfo(name), data)
                rows.append(_record_line(name, data))
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([*rows, [record, "", ""]])
        dst.writestr(record, text.getvalue())
    tmp.replace(wheel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the kit folder (replaced)")
    parser.add_argument("--bnb-cuda", default="130", help="CUDA version of the bitsandbytes library to keep")
    args = parser.parse_args()
    reqs = requirements()
    deepspeed = next(r.split("==")[1] for r in reqs if r.startswith("deepspeed=="))
    if args.out.exists():
        shutil.rmtree(args.out)
    wheels = args.out / "wheels"
    wheels.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        build_deepspeed(deepspeed, wheels)
        image = closure(IMAGE, scratch)
        pinned = {canonical(r.split("==")[0]) for r in reqs if "==" in r}
        held = scratch / "image-versions.txt"  # the image's pins, for what sftdist leaves open
        held.write_text("".join(f"{r}\n" for r in IMAGE if "==" in r and canonical(r.split("==")[0]) not in pinned))
        ours = closure(reqs, scratch, "--find-links", str(wheels), "--constraint", str(held))
        wanted = {n: v for n, v in ours.items() if n != "deepspeed" and not NEVER.match(n)
                  and (n in pinned or n in BOUNDED or image.get(n) != v)}  # fmt: skip
        pip("download", "--quiet", "--no-deps", "--dest", str(wheels), *TARGET, *(f"{n}=={v}" for n, v in sorted(wanted.items())))
    strip_bitsandbytes(next(wheels.glob("bitsandbytes-*.whl")), args.bnb_cuda)
    (args.out / "requirements.txt").write_text("\n".join(reqs) + "\n", encoding="utf-8")
    for script in ("install.sh", "gpu-check.sh"):
        shutil.copy2(HERE / script, args.out / script)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    listing = ", ".join(sorted(p.name.split("-")[0] for p in wheels.glob("*.whl")))
    print(f"build_kit: {args.out}: {size / (1 << 20):.1f} MiB, {len(list(wheels.glob('*.whl')))} wheels ({listing})")
    if size > LIMIT:
        sys.exit(f"build_kit: {args.out} is {size / (1 << 20):.1f} MiB, over the {LIMIT >> 20} MiB a kit may take")


if __name__ == "__main__":
    main()
