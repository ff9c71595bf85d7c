"""The training run, top to bottom: recipe -> data -> model -> trl's SFTTrainer -> saved model.

Read this file first. Every step it calls has one job: `data.pipeline` (the recipe's data read,
rendered, tokenized with loss masks and packed once into a cache entry that every rank
memory-maps), `model` (tokenizer, model, quantization, LoRA), `distributed` (what CPU/multi-process
runs need, and the check that they are really distributed), `checkpoint` (what to do with
output_dir, decided before any heavy work and carried out once the trainer exists; atomic
checkpoints), `resume` (what a checkpoint records of its run, and resuming it at another world
size). The rows arrive packed by trl's best-fit-decreasing packer with
labels built, so trl's own preparation is skipped (`skip_prepare_dataset`) and its padding-free
collator gives each packed sample its own position_ids.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftdist import checkpoint, distributed, fast_head, packed_rows, preemption, preflight, seqpar, throughput
from sftdist.errors import EXIT_PREEMPTED, UserError
from sftdist.recipe import Recipe, accumulation, train_kwargs, typed_train
from sftdist.resume import data_fingerprint, planned
from sftdist.rundir import FINAL_DIR, RUN_INFO, write_json_atomic

if TYPE_CHECKING:
    from sftdist.data.pipeline import Prepared


def build_sft_config(recipe: Recipe) -> Any:
    """trl's SFTConfig from the recipe: our defaults, the recipe's `train:`, then what the hardware needs."""
    from trl import SFTConfig

    from sftdist.model import has_cuda

    train = typed_train(recipe)
    if not has_cuda():
        for flag in ("bf16", "fp16"):
            if train.get(flag):
                raise UserError(
                    f"{recipe.source}: train.{flag}: true, but no GPU is visible and CPU training runs in "
                    f"float32; remove train.{flag}"
                )
    train, hardware = train_kwargs(recipe, train), distributed.training_overrides()
    if "accelerator_config" in hardware:  # merge with the recipe's, rather than replace it
        hardware["accelerator_config"] = {**(train.get("accelerator_config") or {}), **hardware["accelerator_config"]}
    kwargs = {
        **train,
        **hardware,
        **seqpar.training_overrides(recipe),
        "gradient_accumulation_steps": accumulation(recipe, distributed.world_size()),
        "output_dir": recipe.output_dir,
        "max_length": recipe.data.max_length,
        "packing": recipe.data.packing,
        "packing_strategy": "bfd",
        "padding_free": recipe.data.packing,
        # The cache entry holds labels (-100 outside the loss) and packed rows: trl must not prepare again.
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "seed": recipe.train.get("seed", recipe.data.seed),
    }
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"{recipe.source}: invalid train settings ({str(e).splitlines()[0]})") from None


def build_trainer(recipe: Recipe, args: Any, tokenizer: Any, data: Prepared, model: Any) -> Any:
    """trl's SFTTrainer as every run uses it (our checkpointing subclass, LoRA, the CPU head); a
    function of its own so the tests check the very trainer that trains."""
    from trl import SFTTrainer

    from sftdist.model import lora_config

    try:
        trainer = checkpoint.make_trainer_class(SFTTrainer, recipe.max_shard_size)(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=tokenizer,
            peft_config=lora_config(recipe, model) if recipe.method in ("lora", "qlora") else None,
        )
    except ValueError as e:  # the Trainer's own checks of its settings, made when it is built
        raise UserError(f"{recipe.source}: the trainer refuses these train settings ({str(e).splitlines()[0]})") from None
    fast_head.install(trainer)  # CPU: trl's fused head scores every position and attends across the flat batch
    packed_rows.install(trainer, recipe.data.max_length)  # GPU sdpa/eager: no square beyond max_length^2
    seqpar.install(trainer, recipe)  # sequence parallelism: the loss and resume that single training has
    distributed.install_callbacks(trainer)
    throughput.install(trainer, data)  # tokens/s per device and MFU in the logs and the run's metrics
    from sftdist import eval_callback

    eval_callback.install(trainer, recipe)  # the recipe's eval_tasks, at saves
    return trainer


def run_training(recipe: Recipe, resume: bool = True, overwrite: bool = False) -> Path:
    """Train the recipe in this process (one rank of a launch) and return the final model directory."""
    from sftdist.data.cache import fingerprint_inputs
    from sftdist.data.pipeline import prepare
    from sftdist.model import check_local_weights, load_model, load_tokenizer

    with distributed.reported_once():  # a refusal every rank makes alike is printed once per node
        # Every setting, before output_dir is touched; before the SFTConfig too, whose DeepSpeed ZeRO-3
        # config would make transformers build preflight's meta-device model as ZeRO-3 partitions.
        preflight.check_recipe(recipe)
        check_local_weights(recipe.model.name_or_path)  # missing or cut short: one line, as `generate` gives
        args = build_sft_config(recipe)
        run_lock = checkpoint.lock_output_dir(recipe, args)  # rank 0: a second run on output_dir stops here
        tokenizer = functools.cache(lambda: load_tokenizer(recipe))
        # What this run is, and what it does with output_dir: decided before any heavy work, carried out
        # (claim_output_dir) only once the trainer exists, so that no check in between leaves a trace there.
        inputs = fingerprint_inputs(recipe, tokenizer)
        facts = planned(recipe, data_fingerprint(inputs))
        claim = checkpoint.decide(recipe, facts, resume=resume, overwrite=overwrite)
        if claim.action == "finished":
            if run_lock is not None:
                print(f"sftdist: {recipe.output_dir} is a finished run of this recipe ({claim.checkpoint}); nothing "
                      "to do (--no-resume trains it again)", flush=True)
                run_lock.release()
            return claim.checkpoint
        data = prepare(recipe, tokenizer, inputs=inputs)
        model = load_model(recipe, tokenizer())
        trainer = build_trainer(recipe, args, tokenizer(), data, model)
        trainer.sftdist_facts = facts
        preemption.stop_if_requested("before training")  # output_dir is claimed next: nothing there blocks a rerun
        resume_from = checkpoint.claim_output_dir(trainer, recipe, claim, data.report)
    state = distributed.verified_state(trainer)
    if trainer.is_world_process_zero():
        print(f"sftdist: {json.dumps(state)}", flush=True)

    start = time.perf_counter()
    with distributed.reported_once():  # a diverged run stops every rank alike (divergence.py): one line
        result = trainer.train(resume_from_checkpoint=resume_from)
    if trainer.preempted:
        if trainer.is_world_process_zero():
            print(f"sftdist: stopped by a signal at step {trainer.state.global_step} after saving a "
                  "checkpoint; run the same command again to resume", flush=True)
        raise SystemExit(EXIT_PREEMPTED)
    metrics = {**result.metrics, "wall_seconds": time.perf_counter() - start}
    if data.eval is not None:
        metrics.update(trainer.evaluate())

    final = Path(recipe.output_dir) / FINAL_DIR
    with distributed.reported_once():
        checkpoint.save_final(trainer, recipe, final)
    if trainer.is_world_process_zero():
        trainer.save_state()
        from sftdist import eval_callback

        info = {"distributed": state, "metrics": metrics, "final_dir": str(final), **eval_callback.history(trainer, recipe)}
        write_json_atomic(Path(recipe.output_dir) / RUN_INFO, info)
        print(f"sftdist: saved {final}", flush=True)
    if run_lock is not None:
        run_lock.release()
    return final
