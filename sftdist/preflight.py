"""Every recipe check that needs no weights, run before anything is written.

`sftdist train` runs these before it touches output_dir, and `sftdist data --check` runs the same
ones, so a setting that would fail mid-run (at the first optimizer step, the first checkpoint or
when peft wraps the model) is refused while the user can still fix the recipe and rerun it. The
model is read from config.json and, for LoRA, built on the meta device: no weights are loaded.
"""

from __future__ import annotations

from sftdist.errors import UserError
from sftdist.model import check_context, load_config, meta_model, resolve_attention, with_lora
from sftdist.recipe import Recipe, typed_train
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


def check_values(recipe: Recipe) -> None:
    """Ranges that the libraries accept silently and fail on (or train wrongly with) later."""
    src = recipe.source or "recipe"
    lr = typed_train(recipe).get("learning_rate")  # typed: YAML reads 2e-5 as a string
    if lr is not None and lr <= 0:
        raise UserError(f"{src}: train.learning_rate is {lr}; expected a positive number")
    if recipe.method in ("lora", "qlora"):
        lc = recipe.lora
        if lc.r < 1:
            raise UserError(f"{src}: lora.r is {lc.r}; expected a positive integer (the adapter rank), e.g. 16")
        if not 0 <= lc.dropout < 1:
            raise UserError(f"{src}: lora.dropout is {lc.dropout}; expected 0 <= x < 1")
        if not lc.target_modules:
            raise UserError(f"{src}: lora.target_modules is empty; expected all-linear or a list of module names")
    check_shard_size(recipe.max_shard_size, f"{src}: max_shard_size")


def check_recipe(recipe: Recipe) -> None:
    """All checks: values, the model's context, the attention implementation, and that LoRA's
    target_modules match some layer."""
    check_values(recipe)
    check_context(recipe, load_config(recipe))
    resolve_attention(recipe)
    if recipe.method in ("lora", "qlora"):
        with_lora(meta_model(recipe)[1], recipe)  # peft's own matching, on the meta device
