#!/usr/bin/env bash
# sftdist on a GPU machine, in one go (planned for under 8 minutes on one H200), after KIT/install.sh:
#
#     source KIT/env.sh && KIT/gpu-check.sh
#
# 1. selftest 1b full (bf16 autocast), packed at max_length 4096, with trl's SFTTrainer as the baseline;
# 2. selftest QLORA_SIZE (default 8b) qlora: writing its random bf16 weights (16 GB) and loading them in
#    4 bits is most of its time; QLORA_SIZE=1b is the fallback when 8b does not fit the time;
# 3. selftest 1b lora.
# Every report (JSON), log and the machine's description go into OUT (default: ./gpu-check); the random
# models into WORK (default: OUT/work), where a second run reuses them. Exit 1 if any selftest failed.
#
# Variables: OUT, WORK, PYTHON (default: python3), QLORA_SIZE, and for smaller GPUs (or a dry run on a CPU
# with SIZE=tiny QLORA_SIZE=tiny MAX_LENGTH=128): SIZE (default: 1b), MAX_LENGTH (default: 4096), STEPS (default: 20).
set -euo pipefail

python=${PYTHON:-python3}
out=$(mkdir -p "${OUT:-gpu-check}" && cd "${OUT:-gpu-check}" && pwd)
work=${WORK:-$out/work}
size=${SIZE:-1b}
qlora_size=${QLORA_SIZE:-8b}
max_length=${MAX_LENGTH:-4096}
steps=${STEPS:-20}
export SFTDIST_CACHE=${SFTDIST_CACHE:-$work/data-cache}
failed=()

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$python" -c 'import sys, torch, transformers, trl; print(sys.version.split()[0], "torch", torch.__version__,
        "cuda", torch.version.cuda, "transformers", transformers.__version__, "trl", trl.__version__)'
} | tee "$out/environment.txt"

selftest() { # NAME ARGS...: one selftest; its log and report in $out, its table printed
    local name=$1 start=$SECONDS code=0
    shift
    echo "== $name: sftdist selftest $*"
    "$python" -m sftdist selftest "$@" --steps "$steps" --work "$work" --out "$out/$name.json" >"$out/$name.log" 2>&1 || code=$?
    sed -n '/^sftdist selftest:/,$p' "$out/$name.log"
    if ((code)); then
        failed+=("$name")
        tail -n 5 "$out/$name.log"
    fi
    echo "== $name: exit $code after $((SECONDS - start)) s"
}

selftest "$size-full-packed-$max_length" --size "$size" --method full --max-length "$max_length" --baseline
selftest "$qlora_size-qlora" --size "$qlora_size" --method qlora --max-length "$max_length"
selftest "$size-lora" --size "$size" --method lora --max-length "$max_length"

echo "gpu-check: $SECONDS s in all; reports in $out"
if ((${#failed[@]})); then
    echo "gpu-check: failed: ${failed[*]}" >&2
    exit 1
fi
