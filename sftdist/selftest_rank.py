"""One process of `sftdist selftest`: train its recipe with the trainer `sftdist train` builds, measure
it, and with `baseline` run trl's plain SFTTrainer on the same samples and model; rank 0 writes what
it found to `spec["report"]` (selftest.py turns it into the table and the report).

The trainer is built by train.py's own functions (`build_sft_config`, `build_trainer`) from the
tokenizer, data and model that `run_training` loads, so what is measured is what `sftdist train`
runs; the selftest skips only what a throw-away run does not need (output_dir ownership, checkpoints,
the final save).
"""

from __future__ import annotations

import gc
from importlib import metadata
from pathlib import Path
from typing import Any

from sftdist.recipe import Recipe
from sftdist.rundir import write_json_atomic

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "bitsandbytes")


def _gather(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (one process: [obj])."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _losses(trainer: Any) -> dict[str, float | None]:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None}


def _speed(trainer: Any, warmup: int) -> dict[str, Any]:
    """Tokens/s of all processes and per device after `warmup` steps, MFU, and what they rest on."""
    from sftdist import throughput

    callback = throughput.installed(trainer)
    since = callback.since(warmup)
    return {
        "tokens_per_second": since["tokens_per_second"],
        "tokens_per_second_per_device": since.get(throughput.METRIC_TOKENS),
        "mfu": since.get(throughput.METRIC_MFU),
        "measured_steps": [since["from_step"], since["to_step"]],
        "seconds": since["seconds"],
        "tokens": since["tokens"],
        "flops_per_token": callback.flops.to_dict(),
        "peak_tflops": callback.peak,
        "peak_source": callback.peak_source,
    }


def _import_trainer_libraries() -> None:
    """Import what building a trainer imports, before the memory baseline: library code and its import-time
    objects are not what the planner estimates."""
    import importlib.util

    import trl.trainer.sft_trainer  # noqa: F401

    if importlib.util.find_spec("deepspeed") is not None:  # the Trainer imports it when it is installed
        import deepspeed  # noqa: F401


def _device(device: Any) -> dict[str, Any]:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory": props.total_memory}
    import psutil

    return {"type": "cpu", "name": f"CPU ({torch.get_num_threads()} threads)", "memory": psutil.virtual_memory().total}


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _release() -> None:
    """Return the device memory of a trainer that went out of scope (the next one measures its own peak)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unpacked_samples(data: Any) -> Any:
    """The training samples of the packed rows, one row each (input_ids, labels): the same tokens and the
    same loss positions, for a trainer that pads instead of packing."""
    from datasets import Dataset

    table = data.train_table()
    ids, labels = [], []
    for row_ids, row_labels, lengths in zip(*(table.column(c).to_pylist() for c in ("input_ids", "labels", "seq_lengths"))):
        start = 0
        for n in lengths:
            ids.append(row_ids[start:start + n])
            labels.append(row_labels[start:start + n])
            start += n
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def baseline(recipe: Recipe, tokenizer: Any, data: Any, warmup: int) -> dict[str, Any]:
    """trl's SFTTrainer with its own defaults (no packing: each batch padded to its longest sample;
    activation checkpointing on) on the same samples, the same loaded model, the same samples per step
    (packed rows x samples per row), `max_length`, steps, learning rate and precision."""
    from trl import SFTConfig, SFTTrainer

    from sftdist import distributed, probes, throughput
    from sftdist.model import load_model, lora_config

    report = data.report
    per_step = max(1, round(recipe.per_device_batch * report.train_samples / report.train_rows))
    args = SFTConfig(**{
        **recipe.train,
        **distributed.training_overrides(),
        "per_device_train_batch_size": per_step,
        "output_dir": str(Path(recipe.output_dir) / "trl-baseline"),
        "max_length": recipe.data.max_length,
        "include_num_input_tokens_seen": "non_padding",  # a counter for the tokens/s, as sftdist's runs keep it
    })
    watch = probes.MemoryWatch(args.device).start()
    model = load_model(recipe, tokenizer)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=unpacked_samples(data),
        processing_class=tokenizer,
        peft_config=lora_config(recipe, model) if recipe.method in ("lora", "qlora") else None,
    )
    throughput.install(trainer, data)
    trainer.train()
    out = {
        **_speed(trainer, warmup),
        **_losses(trainer),
        "per_device_train_batch_size": per_step,
        "activation_checkpointing": bool(args.gradient_checkpointing),
        "memory": watch.stop(),
    }
    trainer.accelerator.free_memory()
    return out


def measure(recipe: Recipe, spec: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """(tokenizer, data, this rank's findings): train the recipe as `sftdist train` does and measure it."""
    from sftdist import distributed, preflight, probes
    from sftdist.data.pipeline import prepare
    from sftdist.model import load_model, load_tokenizer, unwrapped
    from sftdist.train import build_sft_config, build_trainer

    preflight.check_recipe(recipe)
    args = build_sft_config(recipe)
    tokenizer = load_tokenizer(recipe)
    data = prepare(recipe, lambda: tokenizer, progress=False)
    _import_trainer_libraries()
    watch = probes.MemoryWatch(args.device).start()
    trainer = build_trainer(recipe, args, tokenizer, data, load_model(recipe, tokenizer))
    state = distributed.verified_state(trainer)
    batch = probes.BatchProbe(trainer.model, tokenizer.pad_token_id)
    trainer.train()
    memory = watch.stop()
    world = args.world_size
    found = {
        "device": {**_device(args.device), "count": world},
        "versions": _versions(),
        "ran": {
            "compute_dtype": probes.compute_dtype(trainer),
            "autocast": "bfloat16" if args.bf16 else "float16" if args.fp16 else None,
            # transformers' own record of the implementation that ran (no public accessor)
            "attn_implementation": trainer.model.config._attn_implementation + (
                " (packed rows run as rows of whole samples)"
                if getattr(unwrapped(trainer.model).base_model, "sftdist_rows_of_whole_samples", None) else ""),
            "activation_checkpointing": bool(args.gradient_checkpointing),
            **probes.weights(trainer),
            "batch": batch.seen,
            "strategy": spec["strategy"],
            "distributed": state,
        },
        "throughput": _speed(trainer, spec["warmup"]),
        "loss": _losses(trainer),
        "packing_check": probes.packing_check(trainer),
        "allreduce": probes.allreduce_bandwidth(args.device, world) if world > 1 else None,
        "memory": memory,
        # A signal (SIGTERM, Ctrl-C) stopped the run at this step: every figure above is of a partial run.
        "stopped_at_step": trainer.state.global_step if trainer.preempted else None,
    }
    trainer.accelerator.free_memory()
    return tokenizer, data, found


def run(spec: dict[str, Any]) -> None:
    """One selftest process (see the module docstring); rank 0 writes `spec["report"]`."""
    from sftdist.recipe import load_recipe

    recipe = load_recipe(spec["recipe"])
    tokenizer, data, report = measure(recipe, spec)
    _release()
    report["memory"] = {"devices": _gather(report["memory"])}
    if spec["baseline"] and report["stopped_at_step"] is None:
        report["baseline"] = baseline(recipe, tokenizer, data, spec["warmup"])
        _release()
        report["baseline"]["memory"] = {"devices": _gather(report["baseline"]["memory"])}
    if _rank() == 0:
        write_json_atomic(Path(spec["report"]), report)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
