"""`sftdist plan`: counts from config.json alone, model state against what two real ranks hold, the
published rules of thumb for Llama-3-8B/70B, the recommendations, and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import GPT2_TINY, REPO, run_cli

from sftdist.errors import UserError
from sftdist.plan import (
    GiB,
    count_model,
    estimate,
    make_plan,
    nf4_bytes_per_param,
    parse_size,
    recommend_strategy,
    workload,
)
from sftdist.recipe import recipe_from_dict

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


def test_recommendations(models: dict[str, Path]) -> None:
    assert recommend_strategy(make_recipe(models["tiny"], **FP32), 2, 80 * GiB) == "ddp"
    big = recommend_strategy(make_recipe(models["llama3-8b"]), 8, 80 * GiB)
    assert big in ("zero1", "zero2", "fsdp2", "zero3")  # 8B full: weights, grads and Adam alone are 64 GB under DDP
    ckpt = {"gradient_checkpointing": True}
    assert recommend_strategy(make_recipe(models["llama3-8b"], "qlora", train=ckpt), 1, parse_size("24GB")) == "single"

    with pytest.raises(UserError) as e:
        recommend_strategy(make_recipe(models["llama3-70b"]), 1, 80 * GiB)
    msg = str(e.value)
    assert "no strategy fits method full" in msg and "GiB short" in msg
    assert "method: qlora with checkpointing: single fits" in msg

    # zero3-offload only when the nodes' CPU RAM is known to hold ~18 bytes/param.
    seventy = make_recipe(models["llama3-70b"], train=ckpt)
    with pytest.raises(UserError, match=r"zero3-offload, if each node has 1182\.\d GiB of CPU RAM"):
        recommend_strategy(seventy, 8, 80 * GiB)
    assert recommend_strategy(seventy, 8, 80 * GiB, cpu_memory_bytes=parse_size("2TiB")) == "zero3-offload"
    plan = make_plan(seventy, 8, 80 * GiB, nodes=2)
    assert [e.strategy for e in plan.estimates][0] == "ddp" and plan.world == 16


def test_parse_size() -> None:
    assert parse_size("80GiB") == 80 * GiB
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("81920MiB") == 80 * GiB
    for bad in ("eighty", "80 GBs", "0GiB"):
        with pytest.raises(UserError, match="--gpu-memory"):
            parse_size(bad)


def test_cli(models: dict[str, Path], tmp_path: Path) -> None:
    tiny = write_recipe(tmp_path, models["tiny"], train={"bf16": False})
    calls = [
        ("plan", str(tiny), "--set", "model.dtype=float32", "--gpus", "2", "--gpu-memory", "80GiB"),
        ("plan", str(write_recipe(tmp_path, models["llama3-8b"])), "--gpus", "8", "--gpu-memory", "80GiB"),
        ("plan", str(write_recipe(tmp_path, models["llama3-70b"])), "--gpus", "1", "--gpu-memory", "80GiB"),
        ("plan", str(tiny), "--gpus", "2", "--gpu-memory", "lots"),
    ]
    with ThreadPoolExecutor(len(calls)) as pool:  # the three real plans spend most of their time importing
        tiny_r, r8, r70, bad = pool.map(lambda args: run_cli(*args), calls)

    assert tiny_r.returncode == 0, tiny_r.stderr
    table = [line.split()[0] for line in tiny_r.stdout.splitlines() if line[:1].isalpha()]
    assert {"ddp", "zero1", "zero2", "fsdp2", "zero3", "zero3-offload"} <= set(table)
    assert "recommended: ddp (margin" in tiny_r.stdout and "figures in MiB per GPU" in tiny_r.stdout

    assert r8.returncode == 0, r8.stderr
    assert "8.03B parameters, all trained" in r8.stdout
    assert "recommended: " in r8.stdout and "recommended: ddp" not in r8.stdout

    assert r70.returncode == 2 and "Traceback" not in r70.stderr
    assert "error: " in r70.stderr and "no strategy fits" in r70.stderr and "qlora" in r70.stderr
    assert "single" in r70.stdout  # the table is printed before the error

    assert bad.returncode == 2 and "--gpu-memory 'lots'" in bad.stderr
