"""`sftdist plan`: counts from config.json alone, model state against what two real ranks hold,
activations against real CPU peaks, the published measurements of tests/plan_calibration.py, the
optimizer, sequence parallelism, the recommendations, and the CLI (`plan`, `launch --strategy auto`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import GPT2_TINY, REPO, run_cli

from plan_calibration import ROWS, table

from sftdist.errors import UserError
from sftdist.plan import (
    UNCERTAINTY,
    choose_strategy,
    count_model,
    decoder_activation_bytes,
    estimate,
    format_plan,
    make_plan,
    nf4_bytes_per_param,
    no_fit_error,
    smallest_sp,
    workload,
)
from sftdist.recipe import recipe_from_dict
from sftdist.units import GiB, parse_size

WORKER = REPO / "tests" / "workers" / "count_state.py"
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
    "torch_dtype": "bfloat16",
}
# meta-llama/Meta-Llama-3-8B and -70B config.json, the fields that shape the model.
LLAMA3_8B = {**LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8}  # fmt: skip
LLAMA3_70B = {**LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8}  # fmt: skip
# Big enough that per-rank sums are dominated by real state, not by DeepSpeed's small buffers.
TINY = {**LLAMA, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 256}  # fmt: skip
FP32 = {"model": {"dtype": "float32"}, "train": {"bf16": False}}  # what a CPU run trains in


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model directories holding nothing but a config.json."""
    root = tmp_path_factory.mktemp("plan-models")
    dirs = {}
    for name, config in (("tiny", TINY), ("llama3-8b", LLAMA3_8B), ("llama3-70b", LLAMA3_70B)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
        dirs[name] = root / name
    return dirs


def make_recipe(model_dir: Path, method: str = "full", **sections: dict):
    raw = {"model": {"name_or_path": str(model_dir)}, "method": method, "data": {"train": [{"path": "unused.jsonl"}]}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return recipe_from_dict(raw)


def write_recipe(tmp_path: Path, model: Path, method: str = "full", train: dict | None = None) -> Path:
    path = tmp_path / f"{model.name}-{method}.yaml"
    path.write_text(json.dumps({"model": {"name_or_path": str(model)}, "method": method, "train": train or {},
                                "data": {"train": [{"path": "unused.jsonl"}]}}))  # fmt: skip
    return path


def test_model_state_matches_what_two_real_ranks_hold(models: dict[str, Path], tmp_path: Path) -> None:
    """DDP, ZeRO-2 and ZeRO-3 on 2 gloo processes: summed tensor bytes per rank vs the plan, within 10%."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), "ddp,zero2,zero3", str(models["tiny"]), str(tmp_path)],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [row for rank in (0, 1) for row in json.loads((tmp_path / f"rank{rank}.json").read_text())]
    held = {(r["strategy"], r["rank"]): r["bytes"] for r in rows}
    assert {r["world"] for r in rows} == {2} and len(held) == 6, rows

    recipe = make_recipe(models["tiny"], **FP32)
    counts, work = count_model(recipe), workload(recipe)
    assert counts.total == 853_120
    assert (work.autocast, work.loaded_bytes) == (False, 4)
    for strategy in ("ddp", "zero2", "zero3"):
        planned = estimate(recipe, counts, work, strategy, world=2, nodes=1).model_state
        for rank in (0, 1):
            assert abs(held[strategy, rank] / planned - 1) < 0.10, (strategy, rank, held[strategy, rank], planned)
    # Sharding really happened: ZeRO-2 drops gradients and Adam states by half, ZeRO-3 also the weights.
    assert held["zero3", 0] < held["zero2", 1] < held["ddp", 0]


def test_counts_come_from_config_json_alone(models: dict[str, Path]) -> None:
    assert count_model(make_recipe(models["llama3-8b"])).total == 8_030_261_248
    assert count_model(make_recipe(models["llama3-70b"])).total == 70_553_706_496
    lora = count_model(make_recipe(models["llama3-8b"], "lora", lora={"r": 16}))
    assert lora.trainable == 41_943_040  # peft's count for r=16 on all linear layers of Llama-3-8B
    assert lora.total - lora.trainable == 8_030_261_248
    # GPT-2 layout (Conv1D, tied head): the count equals the tensors stored in the fixture's weights.
    from safetensors import safe_open

    with safe_open(GPT2_TINY / "model.safetensors", framework="pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    gpt2 = count_model(make_recipe(GPT2_TINY))
    assert gpt2.total == stored
    assert (gpt2.model_type, gpt2.gated_mlp, gpt2.intermediate) == ("gpt2", False, 8)


def test_rules_of_thumb_for_llama3(models: dict[str, Path]) -> None:
    """Full mixed-precision Adam ~16 bytes/param before sharding; QLoRA ~0.5-0.6 bytes/param for the frozen base."""
    full = make_recipe(models["llama3-8b"])
    counts, work = count_model(full), workload(full)
    for strategy in ("fsdp2", "zero3", "zero2"):
        state = estimate(full, counts, work, strategy, world=1, nodes=1).model_state
        assert state / counts.total == pytest.approx(16, rel=0.01), strategy
    assert estimate(full, counts, work, "zero3", 8, 1).model_state / counts.total == pytest.approx(2, rel=0.01)
    # DDP keeps the loaded dtype: fp32 weights and AdamW states with AMP (dtype auto for full SFT,
    # 16 B/param), bf16 ones when the recipe asks for bfloat16 weights (8 B/param).
    assert estimate(full, counts, work, "ddp", 8, 1).model_state / counts.total == pytest.approx(16, rel=0.01)
    bf16 = make_recipe(models["llama3-8b"], model={"dtype": "bfloat16"})
    assert estimate(bf16, counts, workload(bf16), "ddp", 8, 1).model_state / counts.total == pytest.approx(8, rel=0.01)

    assert 0.5 <= nf4_bytes_per_param(True) < nf4_bytes_per_param(False) <= 0.6
    qlora = make_recipe(models["llama3-70b"], "qlora")
    qc = count_model(qlora)
    base = qc.total - qc.trainable
    assert qc.quantized / base > 0.97  # everything but embeddings, head and norms is stored in 4 bits
    single = estimate(qlora, qc, workload(qlora), "single", 1, 1)
    frozen_bytes = single.weights - qc.trainable * 2  # trl keeps QLoRA adapters in bf16
    assert 0.5 <= frozen_bytes / base <= 0.6


def recommend_strategy(*args, **kwargs) -> str:
    return choose_strategy(*args, **kwargs)[0]


def test_recommendations(models: dict[str, Path]) -> None:
    assert recommend_strategy(make_recipe(models["tiny"], **FP32), 2, 80 * GiB) == "ddp"
    ckpt = {"gradient_checkpointing": True}
    # 8B full: weights, grads and Adam alone are 64 GB under DDP; ZeRO-1 shards the Adam states and is the fastest
    # strategy that fits (the order is strategies.STRATEGIES).
    big, why = choose_strategy(make_recipe(models["llama3-8b"], train=ckpt), 8, 80 * GiB)
    assert big == "zero1" and why.endswith("; faster but ddp short by 82.7 GiB"), why
    assert recommend_strategy(make_recipe(models["llama3-8b"], "qlora", train=ckpt), 1, parse_size("24GB", "--gpu-memory")) == "single"

    with pytest.raises(UserError) as e:
        recommend_strategy(make_recipe(models["llama3-70b"]), 1, 80 * GiB)
    msg = str(e.value)
    assert "no strategy fits method full" in msg and "GiB short" in msg
    assert "method: qlora with checkpointing: single fits" in msg

    # zero3-offload only when the nodes' CPU RAM is known to hold ~18 bytes/param.
    seventy = make_recipe(models["llama3-70b"], train=ckpt)
    with pytest.raises(UserError, match=r"zero3-offload, if each node has 1182\.\d GiB of CPU RAM"):
        recommend_strategy(seventy, 8, 80 * GiB)
    assert recommend_strategy(seventy, 8, 80 * GiB, cpu_memory_bytes=parse_size("2TiB", "--cpu-memory")) == "zero3-offload"
    plan = make_plan(seventy, 8, 80 * GiB, nodes=2)
    assert [e.strategy for e in plan.estimates][0] == "ddp" and plan.world == 16


def test_parse_size() -> None:
    assert parse_size("80GiB", "--gpu-memory") == 80 * GiB
    assert parse_size("24GB", "--gpu-memory") == 24 * 10**9
    assert parse_size("81920MiB", "--gpu-memory") == 80 * GiB
    for bad in ("eighty", "80 GBs", "0GiB"):
        with pytest.raises(UserError, match="--gpu-memory"):
            parse_size(bad, "--gpu-memory")


def peak_live_bytes(step) -> int:
    """Peak bytes glibc's allocator has handed out during step(), above what was live before, sampled after
    every aten operation (forward and backward): the memory the tensors really took, not a count of them."""
    import ctypes

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd  # small blocks + mmapped large blocks (torch's tensors)

    class Peak(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, in_use())
            return out

    torch.set_num_threads(1)
    before = in_use()
    with Peak() as mode:
        step()
    return mode.peak - before


@pytest.mark.parametrize("shape", [
    {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
     "num_key_value_heads": 2},
    {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 6,
     "num_key_value_heads": 6},
])  # fmt: skip
def test_activation_formula_matches_measured_peaks(shape: dict, tmp_path: Path) -> None:
    """A real forward+backward of the decoder (fp32, sdpa) on the CPU, with and without checkpointing:
    peak live bytes above the weights and their gradients, within 10% of the formula. Measured at 1024 and
    256 tokens and differenced, so that the fixed costs (autograd's graph, Python) drop out."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {**LLAMA, **shape, "vocab_size": 256, "max_position_embeddings": 1024}
    (tmp_path / "config.json").write_text(json.dumps(config))
    long, short = 1024, 256
    recipe = make_recipe(tmp_path, model={"dtype": "float32"}, data={"max_length": long - short},
                         train={"bf16": False, "per_device_train_batch_size": 1})  # fmt: skip
    planned_ckpt, planned_full = decoder_activation_bytes(recipe, count_model(recipe), workload(recipe))

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path), dtype=torch.float32,
                                             attn_implementation="sdpa")  # fmt: skip
    model.config.use_cache = False
    model.train()
    for param in model.parameters():  # allocated before the measurement: only activations are measured
        param.grad = torch.zeros_like(param)

    def peak(tokens: int) -> int:
        ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))

        def step() -> None:
            model.model(input_ids=ids).last_hidden_state.pow(2).mean().backward()

        step()  # warm-up: lazy initialisations stay out of the measurement
        return peak_live_bytes(step)

    measured = {}
    for ckpt in (False, True):
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        measured[ckpt] = peak(long) - peak(short)
    assert measured[True] < measured[False] / 2, measured  # checkpointing really ran
    assert abs(planned_full / measured[False] - 1) < 0.10, (planned_full, measured[False])
    assert abs(planned_ckpt / measured[True] - 1) < 0.10, (planned_ckpt, measured[True])


def test_calibration_against_published_measurements() -> None:
    """Every published setup of tests/plan_calibration.py (the table in docs/plan.md): never more than 10%
    under the measured peak, once what that run did and sftdist does not is accounted for, never 40% over."""
    rows = table()
    assert len(rows) >= 8 and len({r.source for r in ROWS}) >= 8
    for row, planned, ratio in rows:
        assert 0.90 <= ratio <= 1.40, (row.name, planned, row.measured_gib, ratio)
    # The sharded 70B runs were 20-25% under before (0.71-0.80 of the raw figure); they no longer are.
    peft = [planned / row.measured_gib for row, planned, _ in rows if row.name.startswith("peft-")]
    assert min(peft) > 0.80, peft


def test_optimizer_changes_the_plan(models: dict[str, Path]) -> None:
    counts = {m: count_model(make_recipe(models["llama3-8b"], m)) for m in ("full", "qlora")}

    def state(method: str, optim: str | None, strategy: str = "single", **sections: dict) -> float:
        train = {"optim": optim} if optim else {}
        recipe = make_recipe(models["llama3-8b"], method, train=train, **sections)
        return estimate(recipe, counts[method], workload(recipe), strategy, 8, 1).optimizer / counts[method].trainable

    bf16 = {"model": {"dtype": "bfloat16"}}
    assert state("full", None, **bf16) == 4  # default adamw_torch_fused: m + v in the bf16 parameters' dtype
    assert state("full", "paged_adamw_8bit", **bf16) == pytest.approx(2, rel=0.02)  # 1 byte each + absmax
    assert state("full", "adamw_bnb_8bit", **bf16) == state("full", "paged_adamw_8bit", **bf16)
    assert state("full", "sgd", **bf16) == 0
    assert 0 < state("full", "adafactor", **bf16) < 0.01
    # bitsandbytes' 32-bit states are fp32 whatever the parameters: twice torch's for bf16 QLoRA adapters.
    assert state("qlora", "paged_adamw_32bit") == 2 * state("qlora", None) == 8
    # DeepSpeed: fp32 master + the client optimizer's states on its fp32 partition, sharded over 8.
    assert state("full", "paged_adamw_8bit", "zero3") == pytest.approx((4 + 2) / 8, rel=0.02)
    assert state("full", None, "zero3") == pytest.approx(12 / 8)
    unknown = make_recipe(models["llama3-8b"], train={"optim": "grokadamw"})
    e = estimate(unknown, counts["full"], workload(unknown), "single", 1, 1)
    assert e.notes == ("train.optim grokadamw is not modelled: assumed AdamW's two states per parameter",)


def test_tight_is_not_fits(models: dict[str, Path]) -> None:
    recipe = make_recipe(models["tiny"], **FP32)
    plan = make_plan(recipe, 1, 80 * GiB)
    single = plan.estimates[0]
    need = single.total + plan.reserve(single)

    def status(gpu: float) -> str:
        p = make_plan(recipe, 1, int(gpu), counts=plan.counts)
        return p.status(p.estimates[0])

    assert status(need - 1) == "no"
    assert status(need + UNCERTAINTY * single.total / 2) == "tight"
    assert status(need + UNCERTAINTY * single.total * 1.01) == "fits"
    tight = make_plan(recipe, 1, int(need + UNCERTAINTY * single.total / 2), counts=plan.counts)
    assert "recommended: single, but tight" in format_plan(tight)


def test_sequence_parallel(models: dict[str, Path]) -> None:
    """Activations per rank / N, model state unchanged; the smallest N that lets one long sample fit."""
    long = {"max_length": 131072}
    one = {"gradient_checkpointing": True, "per_device_train_batch_size": 1}
    base = make_recipe(models["llama3-8b"], "qlora", data=long, train=one)
    counts = count_model(base)
    plans = {n: make_plan(dataclasses.replace(base, sequence_parallel=n), 8, 24 * 10**9, counts=counts)
             for n in (1, 2, 4, 8)}  # fmt: skip
    for n, plan in plans.items():
        zero3 = next(e for e in plan.estimates if e.strategy == "zero3")
        ref = next(e for e in plans[1].estimates if e.strategy == "zero3")
        assert zero3.model_state == ref.model_state
        layers = decoder_activation_bytes(plan.recipe, counts, plan.work)
        assert layers == pytest.approx(tuple(x / n for x in decoder_activation_bytes(base, counts, plans[1].work)))
        assert zero3.act_ckpt < ref.act_ckpt / n * 1.05
    assert plans[1].recommended is None
    found = smallest_sp(plans[1])
    assert found is not None
    n, alt = found
    assert alt.recommended is not None and plans[n // 2].recommended is None
    assert f"sequence_parallel: {n} with micro-batch 1 and checkpointing" in str(no_fit_error(plans[1]))
    with pytest.raises(UserError, match="sequence_parallel 3 does not divide the 8 GPU"):
        make_plan(dataclasses.replace(base, sequence_parallel=3), 8, 80 * GiB, counts=counts)


def test_cli(models: dict[str, Path], tmp_path: Path) -> None:
    tiny = write_recipe(tmp_path, models["tiny"], train={"bf16": False})
    ckpt8 = write_recipe(tmp_path, models["llama3-8b"], train={"gradient_checkpointing": True})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({k: v for k, v in LLAMA3_8B.items() if k != "hidden_size"}))
    calls = [
        ("plan", str(tiny), "--set", "model.dtype=float32", "--gpus", "2", "--gpu-memory", "80GiB"),
        ("plan", str(ckpt8), "--gpus", "8", "--gpu-memory", "80GiB", "--set", "train.optim=grokadamw"),
        ("plan", str(write_recipe(tmp_path, models["llama3-70b"])), "--gpus", "1", "--gpu-memory", "80GiB"),
        ("plan", str(tiny), "--gpus", "2", "--gpu-memory", "lots"),
        ("plan", str(write_recipe(tmp_path, broken)), "--gpus", "1", "--gpu-memory", "80GiB"),
        ("launch", str(ckpt8), "--strategy", "auto", "--num-processes", "8", "--gpu-memory", "80GiB", "--dry-run"),
        ("launch", str(ckpt8), "--strategy", "auto", "--num-processes", "8", "--gpu-memory", "8GiB", "--dry-run"),
    ]
    with ThreadPoolExecutor(4) as pool:  # the real plans spend most of their time importing
        tiny_r, r8, r70, bad, missing, auto80, auto8 = pool.map(
            lambda args: run_cli(*args, env={"CUDA_VISIBLE_DEVICES": ""}), calls
        )

    assert tiny_r.returncode == 0, tiny_r.stderr
    table_rows = [line.split()[0] for line in tiny_r.stdout.splitlines() if line[:1].isalpha()]
    assert {"ddp", "zero1", "zero2", "fsdp2", "zero3", "zero3-offload"} <= set(table_rows)
    assert "recommended: ddp (margin" in tiny_r.stdout and "figures in MiB per GPU" in tiny_r.stdout

    assert r8.returncode == 0, r8.stderr
    assert "8.03B parameters, all trained" in r8.stdout and "optimizer grokadamw" in r8.stdout
    assert "recommended: " in r8.stdout and "recommended: ddp" not in r8.stdout
    assert "assumption: train.optim grokadamw is not modelled" in r8.stdout
    sp_line = next(line for line in r8.stdout.splitlines() if line.startswith("sequence_parallel options"))
    assert all(f"{n}: activations" in sp_line for n in (1, 2, 4, 8)), sp_line

    assert r70.returncode == 2 and "Traceback" not in r70.stderr
    assert "error: " in r70.stderr and "no strategy fits" in r70.stderr and "qlora" in r70.stderr
    assert "single" in r70.stdout  # the table is printed before the error

    assert bad.returncode == 2 and "--gpu-memory 'lots'" in bad.stderr
    err = missing.stderr.splitlines()  # bitsandbytes' note about `kernels` among them would be noise (sftdist/quiet.py)
    assert missing.returncode == 2 and missing.stdout == "", missing.stdout
    assert err == [f"error: {broken / 'config.json'}: missing 'hidden_size', a size of the model; add it from the "
                   "model's published config.json (transformers would fill in LlamaConfig's default and the plan "
                   "would be for another model)"], err  # fmt: skip

    # launch --strategy auto on this CPU machine: the planner's pick for 8 processes of the given memory.
    assert auto80.returncode == 0, auto80.stderr
    assert "--strategy auto chose zero2: 8 CPU process(es) per machine" in auto80.stderr
    assert "/zero2.yaml" in auto80.stdout and "--num_processes 8" in auto80.stdout
    assert "faster but ddp short by" in auto80.stderr  # says why the faster ones were passed over
    assert auto8.returncode == 2 and "no strategy fits" in auto8.stderr and auto8.stdout == ""


def test_readme_plan_without_the_hub(tmp_path: Path) -> None:
    """The README's `sftdist plan recipes/llama3-8b-qlora.yaml ...` on a machine that cannot reach the hub (and has
    no token for the gated model): the published config.json shipped with sftdist answers, and says so; a
    config.json downloaded into the Hugging Face cache wins over it."""
    shipped = REPO / "sftdist" / "configs" / "published" / "meta-llama" / "Meta-Llama-3-8B" / "config.json"
    assert LLAMA3_8B.items() <= json.loads(shipped.read_text()).items()  # the fields the counts above rely on
    # A downloaded config.json (a 16-layer variant, to tell them apart) in the cache layout huggingface_hub writes.
    cached_home = tmp_path / "cached"
    repo = cached_home / "hub" / "models--meta-llama--Meta-Llama-3-8B"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps({**LLAMA3_8B, "num_hidden_layers": 16}))
    no_hub = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9", "CUDA_VISIBLE_DEVICES": ""}
    argv = ("plan", "recipes/llama3-8b-qlora.yaml", "--gpus", "8", "--gpu-memory", "80GiB")
    with ThreadPoolExecutor(2) as pool:
        bare, cached = pool.map(lambda home: run_cli(*argv, env={**no_hub, "HF_HOME": str(home)}),
                                (tmp_path / "empty", cached_home))  # fmt: skip

    assert bare.returncode == 0 and bare.stderr == "", bare.stderr
    assert "model: meta-llama/Meta-Llama-3-8B (llama, 8.03B parameters + 41.9M trained LoRA parameters" in bare.stdout
    assert f"config.json: the published copy shipped with sftdist ({shipped.parent})" in bare.stdout
    assert "recommended: " in bare.stdout

    assert cached.returncode == 0 and cached.stderr == "", cached.stderr
    assert "model: meta-llama/Meta-Llama-3-8B (llama, 4.54B parameters" in cached.stdout
    assert "shipped" not in cached.stdout
