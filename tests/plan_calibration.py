"""Published, measured peak-memory figures, each as an sftdist recipe, and the planner's figure for it.

Used by tests/test_plan.py (the calibration targets) and run directly to print the table in
docs/plan.md:  PYTHONPATH=. python tests/plan_calibration.py
Each row says what the published run did that sftdist does not (`adjust`, GiB added to the measured
figure: positive when sftdist holds something the run did not, negative for what the run held and
sftdist does not), so that planned / (measured + adjust) compares like with like.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1 << 30
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
         "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}  # fmt: skip
# The fields that shape each model, from its config.json on the Hugging Face hub.
MODELS = {
    "Llama-2-7B": {**LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "Llama-2-70B": {**LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000},
    "Llama-3.1-8B": {**LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "Llama-3.1-70B": {**LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256},
    "Llama-3.2-3B": {**LLAMA, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": True},
}  # fmt: skip
# Per token x vocabulary entry, what transformers' causal-LM loss kept before trl's fused head: the bf16
# logits, their fp32 copy, the shifted fp32 copy and the fp32 log-softmax.
TRL_LOGITS_BYTES = 14

PEFT_DS = "PEFT docs, 'DeepSpeed' guide (huggingface.co/docs/peft/accelerate/deepspeed), 'Memory usage'"
PEFT_FSDP = "PEFT docs, 'Fully Sharded Data Parallel' guide (huggingface.co/docs/peft/accelerate/fsdp), 'Memory usage'"
GIST = ("chenyaofo, 'Benchmark of LLaMA-7B models using deepspeed-based training code' "
        "(gist.github.com/chenyaofo/d4cd6a20ab4b95cb3a49491747e2139a), A800 x 8, torch.cuda.max_memory_allocated()")  # fmt: skip
TORCHTUNE = ("torchtune README, 'Memory and training speed' (github.com/pytorch/torchtune), batch 2, packed to 2048 "
             "tokens, torch.compile")  # fmt: skip
TORCHTUNE_3B = "torchtune README, 'Optimization flags' (Llama 3.2 3B, batch 2 x 4096, bf16, A100), peak memory active"


@dataclass(frozen=True)
class Row:
    name: str
    model: str
    method: str
    strategy: str
    gpus: int
    batch: int
    seq: int
    checkpointing: bool
    measured_gib: float
    measure: str  # "device": nvidia-smi/W&B GPU memory (context and cache included); "allocator": torch peak
    source: str
    adjust_gib: float = 0.0
    adjust_why: str = ""
    recipe: dict = field(default_factory=dict)  # extra recipe sections (lora, quantization, model, train)


def _logits_gib(model: str, tokens: int) -> float:
    return tokens * MODELS[model]["vocab_size"] * TRL_LOGITS_BYTES / GIB


PEFT_LORA = {"lora": {"r": 8, "alpha": 16, "dropout": 0.1}}
PEFT_QLORA = {**PEFT_LORA, "quantization": {"double_quant": True, "compute_dtype": "bfloat16",
                                            "storage_dtype": "bfloat16"}}  # fmt: skip
ROWS = [
    Row("peft-zero3-lora-70b", "Llama-2-70B", "lora", "zero3", 8, 8, 2048, True, 64.0, "device",
        f"{PEFT_DS}: 'the memory consumed per GPU is 64 GB (80%)'",
        -_logits_gib("Llama-2-70B", 8 * 2048), "logits of trl's unfused head", PEFT_LORA),
    Row("peft-zero3-qlora-70b", "Llama-2-70B", "qlora", "zero3", 2, 2, 2048, True, 36.6, "device",
        f"{PEFT_DS} (QLoRA + ZeRO-3): 'the memory consumed per GPU is 36.6 GB'",
        -_logits_gib("Llama-2-70B", 2 * 2048), "logits of trl's unfused head", PEFT_QLORA),
    Row("peft-fsdp-lora-70b", "Llama-2-70B", "lora", "fsdp2", 8, 8, 2048, True, 72.0, "device",
        f"{PEFT_FSDP}: 'the memory consumed per GPU is 72-80 GB (90-98%)', 80 while saving a full state dict",
        -_logits_gib("Llama-2-70B", 8 * 2048), "logits of trl's unfused head; FSDP1 (use_orig_params false), "
        "planned as FSDP2", PEFT_LORA),
    Row("peft-fsdp-qlora-70b", "Llama-2-70B", "qlora", "fsdp2", 2, 2, 2048, True, 35.6, "device",
        f"{PEFT_FSDP} (QLoRA): 'When disabling CPU offloading, the GPU memory usage is 35.6 GB/ GPU'",
        -_logits_gib("Llama-2-70B", 2 * 2048), "logits of trl's unfused head; FSDP1, planned as FSDP2", PEFT_QLORA),
    Row("gist-zero2-7b-ckpt", "Llama-2-7B", "full", "zero2", 8, 1, 4096, True, 23.5, "allocator",
        f"{GIST}: ZeRO-2, checkpointing, batch 1: 19.4/23.5",
        -_logits_gib("Llama-2-7B", 4096), "unfused logits"),
    Row("gist-zero2-7b", "Llama-2-7B", "full", "zero2", 8, 1, 4096, False, 44.8, "allocator",
        f"{GIST}: ZeRO-2, no checkpointing, batch 1: 19.4/44.8",
        -_logits_gib("Llama-2-7B", 4096), "unfused logits"),
    Row("gist-zero3-7b-ckpt", "Llama-2-7B", "full", "zero3", 8, 2, 4096, True, 20.4, "allocator",
        f"{GIST}: ZeRO-3, checkpointing, batch 2: 14.8/20.4",
        -_logits_gib("Llama-2-7B", 2 * 4096), "unfused logits"),
    Row("gist-zero3-7b-ckpt-b8", "Llama-2-7B", "full", "zero3", 8, 8, 4096, True, 39.1, "allocator",
        f"{GIST}: ZeRO-3, checkpointing, batch 8: 17.7/39.1",
        -_logits_gib("Llama-2-7B", 8 * 4096), "unfused logits"),
    Row("torchtune-full-8b-8bit", "Llama-3.1-8B", "full", "single", 1, 2, 2048, True, 37.4, "allocator",
        f"{TORCHTUNE}: 'Llama 3.1 8B | Full finetune | 1x A6000 | 37.4 GiB' (config llama3_1/8B_full_single_device: "
        "PagedAdamW8bit, optimizer_in_bwd, bf16)",
        (8_030_261_248 - 128256 * 4096) * 2 / GIB, "optimizer step fused into the backward: it holds one "
        "parameter's bf16 gradient at a time (the largest, the embedding), sftdist all of them; torch.compile",
        {"model": {"dtype": "bfloat16"}, "train": {"optim": "paged_adamw_8bit"}}),
    Row("torchtune-qlora-8b", "Llama-3.1-8B", "qlora", "single", 1, 2, 2048, True, 7.4, "allocator",
        f"{TORCHTUNE}: 'Llama 3.1 8B | QLoRA | 1x 4090 | 7.4 GiB' (llama3_1/8B_qlora_single_device: r 8, "
        "all linear layers)", 0.0, "torch.compile (lowers the measured peak; not adjusted)",
        {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "quantization": {"compute_dtype": "bfloat16"},
         "train": {"optim": "adamw_torch_fused"}}),
    Row("torchtune-lora-70b", "Llama-3.1-70B", "lora", "fsdp2", 8, 2, 2048, True, 27.6, "allocator",
        f"{TORCHTUNE}: 'Llama 3.1 70B | LoRA | 8x A100 | 27.6 GiB' (llama3_1/70B_lora: FSDP2, r 16 on q, v, o "
        "and the MLP)", 0.0, "adapters in bf16 (accelerate's FSDP2 upcasts them to fp32; not adjusted); torch.compile",
        {"lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                  "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
         "train": {"optim": "adamw_torch_fused"}}),
    Row("torchtune-full-3b", "Llama-3.2-3B", "full", "single", 1, 2, 4096, True, 24.9, "allocator",
        f"{TORCHTUNE_3B}: '+ Activation Checkpointing | 24.9' (compile and chunked cross-entropy on, AdamW in bf16)",
        0.0, "torch.compile, chunked cross-entropy (like trl's fused head)", {"model": {"dtype": "bfloat16"}}),
]


# The same rows planned by the code before the calibration (commit de6248a: AdamW always, saved tensors
# only, ZeRO-3's largest module, a fixed 1 GiB reserve), in GiB, for the before/after ratios in docs/plan.md.
BEFORE_GIB = {"peft-zero3-lora-70b": 48.0, "peft-zero3-qlora-70b": 27.8, "peft-fsdp-lora-70b": 50.9,
              "peft-fsdp-qlora-70b": 28.4, "gist-zero2-7b-ckpt": 26.7, "gist-zero2-7b": 43.5,
              "gist-zero3-7b-ckpt": 16.6, "gist-zero3-7b-ckpt-b8": 26.7, "torchtune-full-8b-8bit": 61.7,
              "torchtune-qlora-8b": 7.4, "torchtune-lora-70b": 30.5, "torchtune-full-3b": 26.3}  # fmt: skip


def row_recipe(row: Row, model_dir: Path):
    """The sftdist recipe that runs the published setup as closely as sftdist can."""
    from sftdist.recipe import recipe_from_dict

    extra = row.recipe
    train = {"per_device_train_batch_size": row.batch, "gradient_checkpointing": row.checkpointing,
             **extra.get("train", {})}  # fmt: skip
    raw = {"model": {"name_or_path": str(model_dir), **extra.get("model", {})}, "method": row.method,
           "data": {"train": [{"path": "unused.jsonl"}], "max_length": row.seq}, "train": train}  # fmt: skip
    for key in ("lora", "quantization"):
        if key in extra:
            raw[key] = extra[key]
    return recipe_from_dict(raw)


def write_models(root: Path) -> dict[str, Path]:
    dirs = {}
    for name, config in MODELS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps(config))
        dirs[name] = root / name
    return dirs


def planned_gib(row: Row, dirs: dict[str, Path], counts_cache: dict) -> float:
    """What the plan says this setup needs: with the reserve for device-level figures, tensors alone otherwise."""
    from sftdist import plan as p

    recipe = row_recipe(row, dirs[row.model])
    key = (row.model, row.method, json.dumps(row.recipe.get("lora", {}), sort_keys=True))
    if key not in counts_cache:
        counts_cache[key] = p.count_model(recipe)
    result = p.make_plan(recipe, row.gpus, 80 * GIB, counts=counts_cache[key])
    est = next(e for e in result.estimates if e.strategy == row.strategy)
    return (est.total + (result.reserve(est) if row.measure == "device" else 0)) / GIB


def table() -> list[tuple[Row, float, float]]:
    """(row, planned GiB, planned / (measured + adjust)) for every row."""
    out = []
    cache: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_models(Path(tmp))
        for row in ROWS:
            planned = planned_gib(row, dirs, cache)
            out.append((row, planned, planned / (row.measured_gib + row.adjust_gib)))
    return out


def markdown() -> str:
    """The calibration table of docs/plan.md."""
    lines = ["| setup | measured GiB | not modelled (GiB) | adjusted | before: planned, ratio | after: planned, ratio |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row, planned, ratio in table():
        adjusted = row.measured_gib + row.adjust_gib
        before = BEFORE_GIB[row.name]
        what = f"{row.method}, {row.strategy} x {row.gpus}, batch {row.batch} x {row.seq}, " + (
            "checkpointing" if row.checkpointing else "no checkpointing"
        )
        lines.append(
            f"| {row.name}: {row.model}, {what} | {row.measured_gib:.1f} ({row.measure}) | "
            f"{row.adjust_gib:+.1f} {row.adjust_why} | {adjusted:.1f} | {before:.1f}, {before / adjusted:.2f} | "
            f"{planned:.1f}, {ratio:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
    sys.exit(0)
