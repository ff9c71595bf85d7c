#!/usr/bin/env bash
# sftdist on a GPU machine, in one go (planned for under 8 minutes on one H200), after KIT/install.sh:
#
#     source KIT/env.sh && KIT/gpu-check.sh
#
# Steps (docs/gpu.md says what each shows, bench/README.md holds the expected figures):
# 1. selftest 1b full (bf16 autocast), packed at max_length 4096, with trl's SFTTrainer as the baseline: the
#    report names the attention that ran (flash, torch's varlen kernel, or regrouped sdpa) and its packing check;
#    on a node of several GPUs it runs on one of them, pinned (CUDA_VISIBLE_DEVICES), and says so;
# 2. selftest QLORA_SIZE (default 8b) qlora: writing its random bf16 weights (16 GB) and loading them in
#    4 bits is most of its time; QLORA_SIZE=1b is the fallback when 8b does not fit the time;
# 3. selftest 1b lora;
# 4. one-process: `sftdist launch --strategy single --dry-run` pins one GPU where several are visible;
# 5. qlora-merge: 2 steps of 1b qlora, `merge-adapter --device cuda` of its adapter (the 4-bit reference on the
#    GPU, never dequantized whole) and `generate` of the merged model (which says it runs on the GPU in bf16);
# 6. compiler: ninja, a C++ compiler and Python's headers, which DeepSpeed's JIT-built ops need, checked before
#    any DeepSpeed run; what is missing is named and the DeepSpeed steps are skipped (failed);
# 7. on 2 or more GPUs: selftest 1b full under ddp, zero3 and fsdp2 and 1b qlora under zero3 on 2 GPUs, about a
#    minute each; their first-step losses side by side (they must agree within bf16 tolerance) and all-reduce
#    bus bandwidths go to OUT/multi-gpu.txt.
# Every report (JSON), log and the machine's description go into OUT (default: ./gpu-check); the random
# models into WORK (default: OUT/work), where a second run reuses them. Exit 1 if any step failed.
#
# Variables: OUT, WORK, PYTHON (default: python3), QLORA_SIZE, and for smaller GPUs (or a dry run on a CPU
# with SIZE=tiny QLORA_SIZE=tiny MAX_LENGTH=128): SIZE (default: 1b), MAX_LENGTH (default: 4096), STEPS (default: 20),
# MULTI_STEPS (default: 10, the multi-GPU runs).
set -euo pipefail

python=${PYTHON:-python3}
out=$(mkdir -p "${OUT:-gpu-check}" && cd "${OUT:-gpu-check}" && pwd)
work=${WORK:-$out/work}
size=${SIZE:-1b}
qlora_size=${QLORA_SIZE:-8b}
max_length=${MAX_LENGTH:-4096}
steps=${STEPS:-20}
multi_steps=${MULTI_STEPS:-10}
gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null) || gpus=0  # as sftdist counts them
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
    "$python" -m sftdist selftest --steps "$steps" "$@" --work "$work" --out "$out/$name.json" >"$out/$name.log" 2>&1 || code=$?
    sed -n '/^sftdist selftest:/,$p' "$out/$name.log"
    if ((code)); then
        failed+=("$name")
        tail -n 5 "$out/$name.log"
    fi
    echo "== $name: exit $code after $((SECONDS - start)) s"
}

step() { # NAME COMMAND...: one step; its output in $out/NAME.log, its last lines printed
    local name=$1 start=$SECONDS code=0
    shift
    echo "== $name: $*"
    "$@" >"$out/$name.log" 2>&1 || code=$?
    tail -n 4 "$out/$name.log"
    ((code)) && failed+=("$name")
    echo "== $name: exit $code after $((SECONDS - start)) s"
}

selftest "$size-full-packed-$max_length" --size "$size" --method full --max-length "$max_length" --baseline
selftest "$qlora_size-qlora" --size "$qlora_size" --method qlora --max-length "$max_length"
selftest "$size-lora" --size "$size" --method lora --max-length "$max_length"

one_process() { # the recipe of step 5; the pinned GPU where several are visible, else nothing to pin
    "$python" -m sftdist launch "$recipe" --strategy single --dry-run
}
model=""
for found in "$work"/models/"$size"*; do # the selftest's model of this size, if it wrote one
    if [ -e "$found" ]; then model=$found; break; fi
done
recipe=$out/qlora-merge.yaml
cat >"$recipe" <<YAML
model: {name_or_path: "$model"}
method: qlora
data: {train: [{path: "$("$python" -c 'import sftdist.selftest as s; print(s.DEMO_TRAIN)')", format: dolly}], max_length: 512}
train: {max_steps: 2, per_device_train_batch_size: 2, save_strategy: "no", report_to: []}
output_dir: "$out/qlora-merge-run"
YAML
step one-process one_process
if ((gpus > 1)) && ! grep -q "CUDA_VISIBLE_DEVICES=" "$out/one-process.log"; then
    echo "one-process: $gpus GPUs visible, but --strategy single pinned none" >&2
    failed+=(one-process)
fi
merge() {
    rm -rf "$out/qlora-merge-run" "$out/qlora-merged"
    "$python" -m sftdist train "$recipe" --no-resume &&
        "$python" -m sftdist merge-adapter --base "$model" --adapter "$out/qlora-merge-run/final" \
            --out "$out/qlora-merged" --device cuda &&
        "$python" -m sftdist generate "$out/qlora-merged" --prompt "Name a colour." --max-new-tokens 8 --greedy
}
step qlora-merge merge

missing=()
command -v ninja >/dev/null || missing+=("ninja (the kit's bin/ on PATH: source KIT/env.sh)")
command -v "${CXX:-c++}" >/dev/null || command -v g++ >/dev/null || missing+=("a C++ compiler (c++/g++, or CXX)")
"$python" -c 'import os, sysconfig, sys; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
    missing+=("Python's headers (Python.h: the python3-dev package)")
if ((${#missing[@]})); then
    echo "== compiler: DeepSpeed builds its ops when first used and needs: ${missing[*]}; DeepSpeed steps skipped" >&2
    failed+=(compiler)
fi

if ((gpus > 1)); then
    multi=()
    for strategy in ddp zero3 fsdp2; do
        if [[ $strategy == zero* ]] && ((${#missing[@]})); then continue; fi
        selftest "1b-full-$strategy-2gpu" --size 1b --method full --max-length "$max_length" --strategy "$strategy" \
            --num-processes 2 --steps "$multi_steps"
        multi+=("1b-full-$strategy-2gpu")
    done
    if ((${#missing[@]} == 0)); then
        selftest "1b-qlora-zero3-2gpu" --size 1b --method qlora --max-length "$max_length" --strategy zero3 \
            --num-processes 2 --steps "$multi_steps"
        multi+=("1b-qlora-zero3-2gpu")
    fi
    "$python" - "$out" "${multi[@]}" <<'PY' | tee "$out/multi-gpu.txt" || failed+=(multi-gpu)
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'run':<24}{'first-step loss':>16}{'final loss':>12}{'bus GB/s':>10}")
losses = {}
for name in sys.argv[2:]:
    f = out / f"{name}.json"
    if not f.is_file():
        print(f"{name:<24}{'failed':>16}")
        continue
    r = json.loads(f.read_text())
    bw = (r.get("allreduce") or {}).get("bus_gb_per_s")
    losses[name] = r["loss"]["first_loss"]
    print(f"{name:<24}{r['loss']['first_loss']:>16.4f}{r['loss']['final_loss']:>12.4f}{bw if bw is None else round(bw, 1)!s:>10}")
full = [v for k, v in losses.items() if "-full-" in k]
if len(full) > 1:  # same model, data and seed: the strategies must agree within bf16 tolerance
    spread = max(full) - min(full)
    print(f"full SFT first-step losses agree within {spread:.2e} ({'ok' if spread <= 2e-2 else 'FAILED: more than 2e-2'})")
    sys.exit(spread > 2e-2)
PY
fi

echo "gpu-check: $SECONDS s in all; reports in $out"
if ((${#failed[@]})); then
    echo "gpu-check: failed: ${failed[*]}" >&2
    exit 1
fi
