"""Every recipe check that needs no weights, run before anything is written.

`sftdist train` runs these before it touches output_dir, and `sftdist data --check` runs the same
ones, so a setting that would fail mid-run (at the first optimizer step, the first checkpoint or
when peft wraps the model) is refused while the user can still fix the recipe and rerun it. The
model is read from config.json and, for LoRA, built on the meta device: no weights are loaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sftdist import save_dtype
from sftdist.errors import UserError
from sftdist.model import (
    check_context, load_config, meta_model, resolve_attention, unquantized_modules_of, with_lora,
)
from sftdist.recipe import Recipe, train_kwargs, typed_train
from sftdist.units import parse_size


def check_shard_size(text: str, where: str) -> int:
    """A shard size that sftdist and transformers' `save_pretrained` both read as the same positive
    number of bytes ('500MB', '5GB', '2GiB'); transformers reads '1.5GB' as an error at the first
    checkpoint and '500mb' as megabits."""
    from transformers.utils.hub import convert_file_size_to_int

    expected = f"{where} {text!r}: expected a whole number and a unit, such as 500MB, 5GB or 2GiB"
    try:
        ours = parse_size(text, where)
        theirs = convert_file_size_to_int(text)
    except (UserError, ValueError):
        raise UserError(expected) from None
    if ours != theirs:
        raise UserError(expected)
    return ours


# `train:` values the libraries accept and then fail on, or train wrongly with: key -> (valid?, what is expected).
# null (unset) is always accepted: the library's default applies.
def _positive(x: float) -> bool:
    return x > 0


def _not_negative(x: float) -> bool:
    return x >= 0


TRAIN_RANGES = {
    # Above 1, AdamW moves every weight by more than its own scale each step: a typo (2e5 for 2e-5).
    "learning_rate": (lambda x: 0 < x <= 1, "a positive number up to 1, such as 2e-5"),
    "per_device_train_batch_size": (_positive, "a positive integer"),
    "per_device_eval_batch_size": (_positive, "a positive integer"),
    "gradient_accumulation_steps": (_positive, "a positive integer"),
    "eval_accumulation_steps": (_positive, "a positive integer (null: no accumulation)"),
    "max_steps": (lambda x: x == -1 or x > 0, "a positive integer, or -1 (unset: train for num_train_epochs)"),
    "num_train_epochs": (_positive, "a positive number (or set train.max_steps)"),
    "logging_steps": (_positive, "a positive number (steps, or a fraction of the run below 1)"),
    "save_steps": (_positive, "a positive number (steps, or a fraction of the run below 1)"),
    "eval_steps": (_positive, "a positive number (null: logging_steps)"),
    "save_total_limit": (_positive, "a positive integer (null: keep every checkpoint)"),
    "warmup_steps": (_not_negative, "0 or more (steps, or a fraction of the run below 1)"),
    "warmup_ratio": (lambda x: 0 <= x <= 1, "0 <= x <= 1"),
    "weight_decay": (_not_negative, "0 or more"),
    "max_grad_norm": (_not_negative, "0 or more (0: no clipping)"),
    "adam_beta1": (lambda x: 0 <= x < 1, "0 <= x < 1"),
    "adam_beta2": (lambda x: 0 <= x < 1, "0 <= x < 1"),
    "adam_epsilon": (_positive, "a positive number"),
    "seed": (_not_negative, "0 or more"),
    "data_seed": (_not_negative, "0 or more (null: train.seed)"),
    "dataloader_num_workers": (_not_negative, "0 or more"),
}


MIN_RANK_LIMIT = 1024  # the largest lora.r refused on no model, however narrow


def check_values(recipe: Recipe) -> None:
    """Ranges that the libraries accept silently and fail on (or train wrongly with) later."""
    src = recipe.source or "recipe"
    train = typed_train(recipe)  # typed: YAML reads 2e-5 as a string
    for key, value in train.items():  # .inf, .nan: accepted by every library, and trained on
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{src}: train.{key} is {value}; expected a finite number")
    for key, (valid, expected) in TRAIN_RANGES.items():
        value = train.get(key)
        if key == "num_train_epochs" and train.get("max_steps", -1) not in (-1, None):
            continue  # max_steps wins
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not valid(value):
            raise UserError(f"{src}: train.{key} is {value}; expected {expected}")
    if recipe.method in ("lora", "qlora"):
        lc = recipe.lora
        if lc.r < 1:
            raise UserError(f"{src}: lora.r is {lc.r}; expected a positive integer (the adapter rank), e.g. 16")
        if lc.alpha <= 0:
            raise UserError(f"{src}: lora.alpha is {lc.alpha}; expected a positive number (the adapter's scale)")
        if not 0 <= lc.dropout < 1:
            raise UserError(f"{src}: lora.dropout is {lc.dropout}; expected 0 <= x < 1")
        if lc.target_parameters and lc.dropout:
            raise UserError(f"{src}: lora.target_parameters needs lora.dropout: 0 (peft adapts parameters without "
                            f"dropout); got {lc.dropout}")
        if not lc.target_modules:
            raise UserError(f"{src}: lora.target_modules is empty; expected all-linear or a list of module names")
    check_shard_size(recipe.max_shard_size, f"{src}: max_shard_size")
    _check_eval(recipe, train)
    _check_report_to(recipe, train)
    _check_cache_outside_output_dir(recipe)


def _check_eval(recipe: Recipe, train: dict) -> None:
    strategy = str(getattr(train.get("eval_strategy"), "value", train.get("eval_strategy") or "no"))
    if strategy != "no" and not recipe.data.eval and recipe.data.eval_fraction == 0:
        raise UserError(
            f"{recipe.source}: train.eval_strategy is {strategy}, but the recipe has no eval data; add data.eval "
            "sources or data.eval_fraction, or set train.eval_strategy: \"no\""
        )


def _check_report_to(recipe: Recipe, train: dict) -> None:
    """Each `report_to` integration must be installed (the Trainer checks only when it is built)."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_reporting_integration_callbacks

    report_to = train_kwargs(recipe, train).get("report_to")
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise UserError(f"{recipe.source}: train.report_to names {name!r}; expected any of "
                            f"{', '.join(INTEGRATION_TO_CALLBACK)}, or [] for none")
        try:
            get_reporting_integration_callbacks([name])[0]()
        except (RuntimeError, ImportError):
            raise UserError(f"{recipe.source}: train.report_to names {name}, which is not installed; install it, or "
                            f"remove it from train.report_to") from None


def _check_cache_outside_output_dir(recipe: Recipe) -> None:
    """--overwrite and --no-resume delete in output_dir: a data cache there would go with them."""
    from sftdist.data.cache import cache_root

    out, root = Path(recipe.output_dir).resolve(), cache_root(recipe).resolve()
    if root == out or out in root.parents:
        raise UserError(
            f"{recipe.source}: the data cache {root} is inside output_dir {out}, where starting over would delete "
            "it; set data.cache_dir (or $SFTDIST_CACHE) to a directory outside output_dir"
        )


def check_sequence_parallel(recipe: Recipe, config: Any) -> None:
    """Ulysses gives each rank whole attention heads: sequence_parallel must divide them (DeepSpeed fails in
    every rank otherwise, with a traceback each)."""
    n = recipe.sequence_parallel
    heads = getattr(config.get_text_config(), "num_attention_heads", None)
    if n > 1 and isinstance(heads, int) and heads % n:
        works = [str(k) for k in range(2, heads + 1) if heads % k == 0]
        raise UserError(
            f"{recipe.source}: sequence_parallel {n} does not divide the {heads} attention heads of "
            f"{recipe.model.name_or_path} (each process takes whole heads); use one of {', '.join(works)}"
        )


def check_strategy(recipe: Recipe, kind: str | None) -> None:
    """Method x strategy pairs refused until a GPU run proves them (`kind`: the launcher's config kind, or
    "fsdp" when accelerate launched this rank under FSDP). QLoRA under FSDP2 must store its packed 4-bit
    weights as bf16 so that they shard, and bitsandbytes #1945 (open) reports that `fully_shard` rewrites
    packed bytes that read as bf16 NaNs (~0.1% of elements) and that `full_tensor()` segfaults in the final
    save; ZeRO-3 and DDP keep the bytes as they are (docs/gpu.md)."""
    if recipe.method == "qlora" and kind == "fsdp":
        raise UserError(
            f"{recipe.source}: method qlora under FSDP2 is refused until a GPU run proves it (bitsandbytes #1945: "
            "sharding can corrupt the 4-bit weights); use --strategy zero3 or ddp"
        )


def check_recipe(recipe: Recipe) -> None:
    """All checks: values, the model's context, the attention implementation, and that LoRA's
    target_modules match some layer."""
    from sftdist.distributed import launched_type

    check_values(recipe)
    check_strategy(recipe, "fsdp" if launched_type() == "FSDP" else None)
    save_dtype.resolve(recipe.save_dtype, None, False, f"{recipe.source}: save_dtype")
    config = load_config(recipe)
    check_context(recipe, config)
    check_sequence_parallel(recipe, config)
    resolve_attention(recipe, config)
    if recipe.method == "qlora":
        unquantized_modules_of(recipe)  # counted now, before a ZeRO-3 SFTConfig exists (see there)
    if recipe.method in ("lora", "qlora"):
        # A rank above a layer's width adds nothing; tiny test models (hidden 2) still take the usual ranks.
        hidden = getattr(config.get_text_config(), "hidden_size", None)
        limit = max(hidden, MIN_RANK_LIMIT) if isinstance(hidden, int) else None
        if limit is not None and recipe.lora.r > limit:
            raise UserError(f"{recipe.source}: lora.r is {recipe.lora.r}; expected at most {limit} (a rank above the "
                            f"model's hidden size {hidden} adds nothing), e.g. 16")
        with_lora(meta_model(recipe)[1], recipe)  # peft's own matching, on the meta device
