"""Checkpoints as each strategy writes them: a stopped launch resumes to the uninterrupted run's
losses and weights, the final model of ZeRO-3 and FSDP2 equals a consolidation of the checkpoint's
shards (not the empty or partial weights those strategies save by default), and `sftdist export`
turns every kind of checkpoint into a model or adapter that transformers/peft load.

The runs are the shared launches of tests/launched.py (checkpoints at steps 2 and 4). Resume under
DDP repeats the same per-rank computations from the restored weights, optimizer, scheduler, RNG
and data position, so it must be exactly equal; ZeRO-3 and FSDP2 restore the same fp32 state
through their own (re)partitioning, so they are held to the strategy tolerances (LOSS_ATOL,
WEIGHT_ATOL; measured: identical losses and weights there too).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import copy_run, run_cli
from launched import LOSS_ATOL, STEPS, WEIGHT_ATOL, final_weights, history, launch, trained, write_recipe
from sftdist.rundir import COMPLETE_MARKER, RUN_FILES
from sftdist.export import checkpoint_kind, consolidated_state_dict


def stopped_copy(run: Path, dest: Path) -> Path:
    """`run` as it would be had it been killed while writing checkpoint-4: checkpoint-2 complete,
    checkpoint-4 with its files but no completion marker, no final model; returns the recipe."""
    recipe = copy_run(run, run.parent / "recipe.yaml", dest)
    (dest / f"checkpoint-{STEPS}" / COMPLETE_MARKER).unlink()
    return recipe


@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp2"])
def test_stopped_launch_resumes_to_the_same_run(tmp_path, tmp_path_factory, tiny_model, demo_rows, strategy):
    run = trained(tmp_path_factory, tiny_model, demo_rows, "full", strategy)
    copy = tmp_path / "run"
    proc = launch(stopped_copy(run, copy), strategy)

    assert f"sftdist: resuming from {copy / 'checkpoint-2'}\n" in proc.stdout
    state = json.loads((copy / "sftdist_run.json").read_text())["distributed"]
    assert state["num_processes"] == 2
    marker = json.loads((copy / f"checkpoint-{STEPS}" / COMPLETE_MARKER).read_text())
    assert (marker["global_step"], marker["world_size"], marker["global_batch"]) == (STEPS, 2, 4)

    losses, ref_losses = history(copy)[0], history(run)[0]
    weights, ref_weights = final_weights(copy), final_weights(run)
    assert weights.keys() == ref_weights.keys()
    if strategy == "ddp":
        assert losses == ref_losses
        assert all(weights[k].equal(ref_weights[k]) for k in weights)
    else:
        assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= LOSS_ATOL, (losses, ref_losses)
        worst = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights)
        assert worst <= WEIGHT_ATOL, worst


@pytest.mark.parametrize("method, strategy, kind", [
    ("full", "zero3", "zero"), ("full", "fsdp2", "fsdp"), ("lora", "fsdp2", "fsdp-adapter"),
])
def test_final_model_equals_the_consolidated_shards(tmp_path_factory, tiny_model, demo_rows, method, strategy, kind):
    run = trained(tmp_path_factory, tiny_model, demo_rows, method, strategy)
    ckpt = run / f"checkpoint-{STEPS}"  # saved at the same step as the final model
    assert checkpoint_kind(ckpt) == kind
    shards = consolidated_state_dict(ckpt, kind)
    final = final_weights(run)
    single = final_weights(trained(tmp_path_factory, tiny_model, demo_rows, method, "single"))
    assert final.keys() == single.keys()  # whole: every tensor, at its full shape
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in single.items()}
    assert final.keys() <= shards.keys()
    # One dtype under every strategy: the base's own (the tiny model says float32), not what the strategy gathered.
    expected = torch.float32 if method == "full" else next(iter(single.values())).dtype
    assert {t.dtype for t in final.values()} == {expected}
    for name, tensor in final.items():
        assert tensor.equal(shards[name].to(tensor.dtype)), name


def test_save_dtype_is_final_and_export_dtype_under_zero3(tmp_path, tiny_model, demo_rows):
    """`save_dtype: bfloat16`: final/ of a 2-process ZeRO-3 run and the export of its last checkpoint are bf16,
    and both equal the consolidated fp32 shards cast to bf16."""
    from safetensors.torch import load_file

    recipe = tmp_path / "recipe.yaml"
    write_recipe(recipe, tiny_model, demo_rows, "full", tmp_path / "run")
    raw = yaml.safe_load(recipe.read_text())
    raw["save_dtype"] = "bfloat16"
    recipe.write_text(yaml.safe_dump(raw))
    launch(recipe, "zero3", env={"SFTDIST_CACHE": str(tmp_path / "cache")})
    run = tmp_path / "run"
    final = final_weights(run)
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    assert json.loads((run / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    shards = consolidated_state_dict(run / f"checkpoint-{STEPS}", "zero")
    assert {t.dtype for t in shards.values()} == {torch.float32}
    for name, tensor in final.items():
        assert tensor.equal(shards[name].to(torch.bfloat16)), name
    out = tmp_path / "exported"
    proc = run_cli("export", str(run / f"checkpoint-{STEPS}"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_file(out / "model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    assert all(exported[k].equal(final[k]) for k in final)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


EXPORTS = [
    ("full", "ddp", "full"),
    ("full", "zero2", "zero"),
    ("full", "zero3", "zero"),
    ("full", "fsdp2", "fsdp"),
    ("lora", "zero3", "adapter"),
    ("lora", "fsdp2", "fsdp-adapter"),
]


@pytest.mark.parametrize("method, strategy, kind", EXPORTS, ids=[f"{m}-{s}" for m, s, _ in EXPORTS])
def test_export_each_checkpoint_kind(tmp_path, tmp_path_factory, tiny_model, demo_rows, method, strategy, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = trained(tmp_path_factory, tiny_model, demo_rows, method, strategy)
    ckpt = run / f"checkpoint-{STEPS}"
    assert checkpoint_kind(ckpt) == kind
    out = tmp_path / "exported"
    proc = run_cli("export", str(ckpt), "--out", str(out), "--max-shard-size", "300KB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == f"wrote {out}"
    final = final_weights(run)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    for name in RUN_FILES:  # the run's recipe and prompt style travel with every export
        assert (out / name).read_bytes() == (run / name).read_bytes(), name

    if method == "full":
        assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) >= len(final)
        assert len(list(out.glob("model-*.safetensors"))) >= 3
        model = AutoModelForCausalLM.from_pretrained(out)
        state = model.state_dict()
        for name, tensor in final.items():
            assert state[name].equal(tensor), name
        assert model.generation_config.eos_token_id == tok.eos_token_id
        return

    from peft import PeftModel
    from safetensors.torch import load_file

    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter.keys() == final.keys()
    assert all(adapter[k].equal(final[k]) for k in final)
    assert yaml.safe_load((out / "sftdist_recipe.yaml").read_text())["method"] == "lora"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    loaded = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert all(loaded[k].equal(final[k]) for k in final)

    if kind == "fsdp-adapter":  # --merge from FSDP shards: the adapter is rebuilt, then merged and verified
        merged = tmp_path / "merged"
        proc = run_cli("export", str(ckpt), "--out", str(merged), "--merge")
        assert proc.returncode == 0, proc.stderr[-3000:]
        import torch

        ids = tok("### Instruction:\nName a colour.\n\n### Response:\n", return_tensors="pt").input_ids
        with torch.no_grad():
            expected = peft_model.eval()(ids).logits
            got = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
        assert (got - expected).abs().max().item() <= 1e-4
        assert not list(tmp_path.glob(".merged.*")) and not list(tmp_path.glob(".exported.*"))


def test_export_merge_of_a_full_checkpoint_is_refused(tmp_path, tmp_path_factory, tiny_model, demo_rows):
    run = trained(tmp_path_factory, tiny_model, demo_rows, "full", "ddp")
    out = tmp_path / "out"
    proc = run_cli("export", str(run / f"checkpoint-{STEPS}"), "--out", str(out), "--merge")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {run / f'checkpoint-{STEPS}'}: --merge needs a LoRA/QLoRA checkpoint, but this one holds a full model"
    )
    assert not out.exists()
