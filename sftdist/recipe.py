"""YAML recipe -> one typed `Recipe`.

The recipe maps 1:1 onto the code: `model` -> model.py, `method`/`lora`/`quantization` -> the
adapter, `data` -> data/, `train` -> trl's `SFTConfig` (passed through, over our defaults:
`train_kwargs`), `output_dir`. Unknown keys are errors that suggest the nearest valid key; values
are checked against the field's type, so a typo fails before any model is loaded. This module
imports nothing heavy (the `train` section is checked against `SFTConfig` only by `typed_train`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftdist.errors import UserError

METHODS = ("full", "lora", "qlora")
# dpo_chosen / kto_good: preference or labelled rows, trained on the chosen response / the rows labelled true.
FORMATS = ("auto", "text", "prompt_completion", "dolly", "alpaca", "messages", "sharegpt", "dpo_chosen", "kto_good")
LOSS_ON = ("completion", "all")
MAX_WEIGHT = 1000  # a source repeated more often than this is a typo, and would fill the memory
DTYPES = ("auto", "bfloat16", "float16", "float32")

# Our defaults for trl's SFTConfig; any `train:` key in the recipe wins.
TRAIN_DEFAULTS: dict[str, Any] = {
    "report_to": ["tensorboard"],
    # trl turns it on by default; recomputing activations costs ~25% of the speed (docs/plan.md), and
    # small models do not need it. Recipes for large models set it (and `sftdist plan` says when).
    "activation_checkpointing": False,
    "logging_steps": 10,
    "save_steps": 500,
    "save_total_limit": 3,
    "include_num_input_tokens_seen": "non_padding",
    "dataloader_drop_last": False,
    # Every parameter of a causal LM (or of its adapter) gets a gradient: DDP's search for unused ones
    # costs a graph traversal per step and prints a warning on every run.
    "ddp_find_unused_parameters": False,
    # The Trainer's default logs a NaN or infinite loss as the mean of the earlier ones (0 on the first
    # step); a diverged run stops instead (divergence.py), and its loss is logged as it is.
    "logging_nan_inf_filter": False,
}
# The library defaults (TrainingArguments / SFTConfig) of the `train:` keys that sftdist itself reads
# before any SFTConfig exists (the planner, the data report, the data cache).
LIBRARY_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "shuffle_dataset": False,
    "ignore_data_skip": False,
}


@dataclass
class ModelConfig:
    """Which model to load and how."""

    # A local model directory or a hub id (org/name). Required.
    name_or_path: str = ""
    # auto | bfloat16 | float16 | float32; auto: fp32 weights with bf16 autocast for full SFT on GPUs, bf16 for a
    # frozen LoRA base on GPUs, fp32 on CPU.
    dtype: str = "auto"
    # "auto": the first of flash_attention_2, sdpa, eager that this machine runs and the model class implements
    # (all keep packed samples apart; model.AUTO_ATTENTION).
    attn_implementation: str = "auto"
    # Run the model repository's own Python code; off unless you trust it.
    trust_remote_code: bool = False


@dataclass
class LoraConfig:
    """peft LoRA settings, used by `method: lora` and `method: qlora`."""

    # Rank, scaling numerator (scale = alpha / r) and dropout of the adapters.
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # "all-linear" covers nn.Linear and GPT-2's Conv1D, except the output layer.
    target_modules: str | list[str] = "all-linear"
    # peft's target_parameters: parameters (not modules) to adapt, e.g. an MoE's fused experts
    # ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]; peft wraps them only with dropout: 0.
    target_parameters: list[str] | None = None
    use_dora: bool = False
    use_rslora: bool = False


@dataclass
class QuantizationConfig:
    """bitsandbytes 4-bit settings for `method: qlora`."""

    # nf4 | fp4; double_quant also quantizes the quantization constants (~0.4 bits/param less).
    quant_type: str = "nf4"
    double_quant: bool = True
    # "auto": bfloat16 where the hardware has it, float32 on CPU.
    compute_dtype: str = "auto"
    # dtype the packed 4-bit weights are stored in; "auto": compute_dtype under FSDP2/ZeRO-3 (so they
    # shard), else uint8.
    storage_dtype: str = "auto"


@dataclass
class SourceConfig:
    """One data source."""

    # .jsonl .json .parquet .csv .arrow, a save_to_disk directory, or a hub id. Required.
    path: str = ""
    # auto (detected from the columns) | text | prompt_completion | dolly | alpaca | messages | sharegpt |
    # dpo_chosen | kto_good (docs/data.md).
    format: str = "auto"
    # 0.5 keeps a random half of this source, 2.0 repeats it twice (after the eval split).
    weight: float = 1.0
    # The split of a hub id or DatasetDict directory.
    split: str = "train"
    # The first N rows only; null: every row.
    limit: int | None = None


@dataclass
class DataConfig:
    """Training/eval data, rendering and packing."""

    # One or more sources, mixed by weight.
    train: list[SourceConfig] = field(default_factory=list)
    # Evaluation sources, same shape as train; or hold out eval_fraction of the training samples instead.
    eval: list[SourceConfig] = field(default_factory=list)
    eval_fraction: float = 0.0
    # Tokens per sample, and per packed row.
    max_length: int = 1024
    # Best-fit-decreasing packing without padding; samples never attend to each other.
    packing: bool = True
    # completion (responses, assistant turns, + EOS) | all (every token).
    loss_on: str = "completion"
    # Prompt template for instruction formats (dolly, alpaca); see data/templates.py.
    template: str = "default"
    # Chat template for chat formats: auto (the tokenizer's; assistant tokens from its {% generation %}
    # markers, trl's training template of its family, or prefix rendering), chatml, a model family
    # whose training template trl ships (qwen3, llama3, ...), or a .jinja path. null means auto.
    chat_template: str | None = "auto"
    # Over-long samples are dropped (and counted) unless truncate is true.
    truncate: bool = False
    # Processes that encode the data when the cache entry is built; null: this process alone.
    num_proc: int | None = None
    # Seed of the eval split, of the weights' draws and of the shuffle before packing (train.shuffle_dataset).
    seed: int = 42
    # Where prepared data is cached (data/cache.py); default $SFTDIST_CACHE, else ~/.cache/sftdist/data.
    cache_dir: str | None = None


@dataclass
class EvalTasksConfig:
    """lm-eval tasks run on the model at checkpoint saves, as `sftdist eval` runs them (eval_callback.py)."""

    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None  # a folder of your own task YAMLs
    limit: int | None = None  # documents per task
    every_n_saves: int = 1
    batch_size: int = 8


@dataclass
class Recipe:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    # full | lora | qlora (LoRA on a 4-bit base).
    method: str = "full"
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Passed through to trl's SFTConfig; keys are checked against it by `typed_train`.
    train: dict[str, Any] = field(default_factory=dict)
    # The run's directory: checkpoints, final/, logs; one run per output_dir.
    output_dir: str = "runs/sft"
    # Largest safetensors file in checkpoints and the final model (e.g. "5GB", "500MB").
    max_shard_size: str = "5GB"
    # dtype of a full model's final/ and exports: auto = the base model's own (config.json), else bf16 on GPUs,
    # fp32 on CPU; or float32, bfloat16, float16 (save_dtype.py).
    save_dtype: str = "auto"
    # Processes that share each sample (DeepSpeed Ulysses, see seqpar.py); data-parallel size = world / this.
    sequence_parallel: int = 1
    # Sequences (packed rows) per optimizer step over all processes; null: per-device batch x
    # train.gradient_accumulation_steps x data-parallel processes. When set, each run derives its
    # accumulation from it, so the same recipe trains the same steps (and resumes) at any world size.
    global_batch_size: int | None = None
    # lm-eval tasks evaluated at saves; empty: none. Not part of the run's identity (see _NOT_IDENTITY).
    eval_tasks: EvalTasksConfig = field(default_factory=EvalTasksConfig)
    source: str = field(default="", metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def train_setting(self, key: str) -> Any:
        """A `train:` value as the trainer will get it: the recipe's, else ours, else the library's."""
        return train_kwargs(self).get(key, LIBRARY_DEFAULTS.get(key))

    @property
    def per_device_batch(self) -> int:
        return self.train_setting("per_device_train_batch_size")

    @property
    def shuffle_dataset(self) -> bool:
        """trl's `shuffle_dataset` (before packing), which the data cache applies since trl's preparation is skipped."""
        return bool(self.train_setting("shuffle_dataset"))

    @property
    def activation_checkpointing(self) -> bool:
        return bool(self.train_setting("activation_checkpointing"))


# Keys that do not change what a run learns: how its global batch is expressed (the same run may say
# `global_batch_size: 64` or `gradient_accumulation_steps: 2` on 32 processes; the global batch itself is checked
# against the checkpoint), and how often it logs and saves (more frequent checkpoints after a preemption).
_NOT_IDENTITY = ("global_batch_size", "gradient_accumulation_steps", "logging_steps", "logging_first_step",
                 "save_steps", "save_total_limit", "report_to", "eval_tasks", "save_dtype")


def run_identity(recipe_dict: dict[str, Any]) -> dict[str, Any]:
    """A saved or loaded recipe (as a mapping) without the keys that do not change what is learned: two
    recipes with the same identity are the same run (checkpoint.py compares the global batch separately)."""
    d = {k: v for k, v in recipe_dict.items() if k not in _NOT_IDENTITY}
    d["train"] = {k: v for k, v in (d.get("train") or {}).items() if k not in _NOT_IDENTITY}
    # Where a data source is read from is not what is learned: its content is, which resume checks
    # (resume.check_data), so data moved or re-staged elsewhere continues the same run.
    data = d.get("data") if isinstance(d.get("data"), dict) else {}
    d["data"] = {**data, **{role: [{k: v for k, v in s.items() if k != "path"} if isinstance(s, dict) else s
                                   for s in data.get(role) or []] for role in ("train", "eval")}}
    return d


def accumulation(recipe: Recipe, world_size: int) -> int:
    """Gradient accumulation steps of a run of `world_size` processes: the recipe's, or derived from
    `global_batch_size`; a UserError naming the process counts that would work when none divides."""
    b, sp = recipe.per_device_batch, recipe.sequence_parallel
    n = recipe.global_batch_size
    if n is None:
        return recipe.train_setting("gradient_accumulation_steps")
    src = recipe.source or "recipe"
    if n % b:
        raise UserError(f"{src}: global_batch_size {n} is not a multiple of train.per_device_train_batch_size {b}")
    dp = world_size // sp
    if dp and n % (b * dp) == 0 and world_size % sp == 0:
        return n // (b * dp)
    per_group = f" ({sp} per sample: sequence_parallel)" if sp > 1 else ""
    # The divisors of n // b up to a bound: a huge global_batch_size (1e12) would be searched for hours.
    works = [str(d * sp) for d in range(1, min(n // b, _MAX_LISTED_GROUPS) + 1) if (n // b) % d == 0]
    more = ", ..." if n // b > _MAX_LISTED_GROUPS else ""
    raise UserError(
        f"{src}: global_batch_size {n} with per_device_train_batch_size {b} needs a number of processes{per_group} "
        f"whose data-parallel share divides {n // b}: {', '.join(works)}{more}; got {world_size}"
    )


_MAX_LISTED_GROUPS = 1024  # data-parallel group counts listed when global_batch_size does not divide


def _canonical(train: dict[str, Any]) -> dict[str, Any]:
    """`train:` with transformers 5's deprecated `gradient_checkpointing*` aliases renamed to
    `activation_checkpointing*`, which win whenever set (so the alias never silently loses to our default)."""
    train = dict(train)
    for alias, name in (("gradient_checkpointing", "activation_checkpointing"),
                        ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if alias in train:
            train.setdefault(name, train.pop(alias))
    return train


def train_kwargs(recipe: Recipe, train: dict[str, Any] | None = None) -> dict[str, Any]:
    """Our defaults overlaid with the recipe's `train:` (or `train`, its typed copy)."""
    return {**TRAIN_DEFAULTS, **_canonical(recipe.train if train is None else train)}


def with_train(recipe: Recipe, **changes: Any) -> Recipe:
    """The same recipe with `train:` keys changed, for what-if plans."""
    return dataclasses.replace(recipe, train={**_canonical(recipe.train), **changes})


class _RecipeLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing what it would otherwise accept silently: a key given twice (PyYAML
    keeps the last) and a key that is not a string (`1:`, `true:`, `null:`), which names no setting."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is not a string; keys are setting names", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _choices_error(where: str, value: Any, choices: tuple[str, ...]) -> UserError:
    return UserError(f"{where}: '{value}' is not valid; expected one of: {', '.join(choices)}")


def _type_name(tp: Any) -> str:
    """How a field type reads in an error, in YAML's words ('null', not 'NoneType')."""
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).split(' ', 1)[-1]}s"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against a field type (str, int, float, bool, X | None, list[X], dataclass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except UserError:
                continue
        raise UserError(f"{where}: got {value!r}, expected {' or '.join(_type_name(a) for a in args)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{where}: got {value!r}, expected a list")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: got {value!r}, expected a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where}: got {value!r}, expected an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 2e-5 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        raise UserError(f"{where}: got {value!r}, expected a {'finite ' if number is not None else ''}number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: got {value!r}, expected a string")
    return value


def _unknown_key(where: str, key: str, valid: list[str]) -> UserError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(sorted(valid))}"
    path = f"{where}.{key}" if where else key
    return UserError(f"unknown recipe key '{path}'{hint}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{where or 'recipe'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown_key(where, str(key), list(fields))
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=50")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides onto the raw mapping (values parsed as YAML scalars)."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = raw
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is not None and not isinstance(child, dict):
                where = ".".join(keys[: i + 1])
                raise UserError(f"--set {item!r}: '{where}' is {child!r}, not a mapping of keys; set it whole, "
                                f"e.g. --set '{where}=...'")
            if child is None:  # absent, or an empty section (`lora:` with nothing under it)
                child = node[k] = {}
            node = child
        node[keys[-1]] = value
    return raw


def validate(recipe: Recipe) -> Recipe:
    """Checks that need more than a type: choices, ranges, required keys."""
    src = recipe.source or "recipe"
    if not recipe.model.name_or_path:
        raise UserError(f"{src}: model.name_or_path is required (a local model directory or a hub id)")
    if recipe.method not in METHODS:
        raise _choices_error(f"{src}: method", recipe.method, METHODS)
    if recipe.model.dtype not in DTYPES:
        raise _choices_error(f"{src}: model.dtype", recipe.model.dtype, DTYPES)
    if recipe.quantization.compute_dtype not in DTYPES:
        raise _choices_error(f"{src}: quantization.compute_dtype", recipe.quantization.compute_dtype, DTYPES)
    if recipe.quantization.storage_dtype not in (*DTYPES, "uint8"):
        raise _choices_error(f"{src}: quantization.storage_dtype", recipe.quantization.storage_dtype, (*DTYPES, "uint8"))
    if recipe.quantization.quant_type not in ("nf4", "fp4"):
        raise _choices_error(f"{src}: quantization.quant_type", recipe.quantization.quant_type, ("nf4", "fp4"))
    if recipe.data.loss_on not in LOSS_ON:
        raise _choices_error(f"{src}: data.loss_on", recipe.data.loss_on, LOSS_ON)
    if not recipe.data.train:
        raise UserError(f"{src}: data.train is empty; expected a list of sources, e.g. [{{path: data.jsonl}}]")
    for kind, sources in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        for i, s in enumerate(sources):
            if not s.path:
                raise UserError(f"{src}: data.{kind}[{i}].path is required")
            if s.format not in FORMATS:
                raise _choices_error(f"{src}: data.{kind}[{i}].format", s.format, FORMATS)
            if not 0 < s.weight <= MAX_WEIGHT:
                raise UserError(f"{src}: data.{kind}[{i}].weight is {s.weight}; expected a positive number up to "
                                f"{MAX_WEIGHT} (the times each sample is repeated; 0.5 keeps half)")
            if s.limit is not None and s.limit < 1:
                raise UserError(f"{src}: data.{kind}[{i}].limit is {s.limit}; expected a positive number of rows "
                                "(null: every row)")
    if not 0.0 <= recipe.data.eval_fraction < 1.0:
        raise UserError(f"{src}: data.eval_fraction is {recipe.data.eval_fraction}; expected 0 <= x < 1")
    for key, value, least in (("data.max_length", recipe.data.max_length, 8), ("data.seed", recipe.data.seed, 0),
                              ("data.num_proc", recipe.data.num_proc, 1),
                              ("sequence_parallel", recipe.sequence_parallel, 1),
                              ("global_batch_size", recipe.global_batch_size, 1)):
        if value is not None and value < least:
            raise UserError(f"{src}: {key} is {value}; expected at least {least}")
    if recipe.global_batch_size is not None and "gradient_accumulation_steps" in recipe.train:
        raise UserError(
            f"{src}: global_batch_size and train.gradient_accumulation_steps are both set; keep global_batch_size "
            "(each run derives its accumulation from it and the number of processes) and remove the other"
        )
    _validate_eval_tasks(recipe.eval_tasks, src)
    from sftdist.data.templates import CHAT_TEMPLATES, PROMPT_TEMPLATES, training_families

    if recipe.data.template not in PROMPT_TEMPLATES:
        raise _choices_error(f"{src}: data.template", recipe.data.template, tuple(PROMPT_TEMPLATES))
    ct = recipe.data.chat_template
    if ct not in (None, "auto", *CHAT_TEMPLATES) and not ct.endswith(".jinja") and ct not in training_families():
        choices = ("auto", *CHAT_TEMPLATES, *training_families(), "a path ending in .jinja")
        raise _choices_error(f"{src}: data.chat_template", ct, choices)
    return recipe


def _validate_eval_tasks(cfg: EvalTasksConfig, src: str) -> None:
    if cfg != EvalTasksConfig() and not cfg.tasks:
        raise UserError(f"{src}: eval_tasks.tasks is empty; expected a list of lm-eval task names, e.g. [sftdist_demo_gen]")
    for i, task in enumerate(cfg.tasks):
        if not task.strip():
            raise UserError(f"{src}: eval_tasks.tasks[{i}] is empty; expected an lm-eval task name")
    for key, value in (("limit", cfg.limit), ("every_n_saves", cfg.every_n_saves), ("batch_size", cfg.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{src}: eval_tasks.{key} is {value}; expected at least 1")
    if cfg.include_path is not None and not Path(cfg.include_path).is_dir():
        raise UserError(f"{src}: eval_tasks.include_path: {cfg.include_path} is not a directory of task YAMLs")


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Build and validate a Recipe from a plain mapping (what YAML gives)."""
    recipe = _build(Recipe, raw, "")
    recipe.source = source
    return validate(recipe)


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read a YAML recipe with the safe loader, apply --set overrides, type-check every key."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: recipe file not found")
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{p}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: recipe is not UTF-8 text") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{p}: expected a mapping of recipe keys at the top level, got {type(raw).__name__}")
    try:
        return recipe_from_dict(apply_overrides(raw, overrides), source=str(p))
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(str(p)) else f"{p}: {msg}") from None


def typed_train(recipe: Recipe) -> dict[str, Any]:
    """`train:` checked against trl's SFTConfig fields, its plain scalars converted to the field's type
    (YAML reads 2e-5 as a string); imports trl, so it is not done at load time. The recipe is unchanged."""
    from trl import SFTConfig

    hints = typing.get_type_hints(SFTConfig)
    names = [f.name for f in dataclasses.fields(SFTConfig) if f.init]
    owned = {"output_dir", "max_length", "packing", "completion_only_loss", "assistant_only_loss"}
    typed = dict(recipe.train)
    for key, value in recipe.train.items():
        if key in owned:
            where = "output_dir" if key == "output_dir" else f"data.{key}"
            raise UserError(f"{recipe.source}: train.{key} is set by sftdist; use the recipe key '{where}' instead")
        if key not in names:
            raise UserError(f"{recipe.source}: {_unknown_key('train', key, names)}")
        tp = hints.get(key, Any)
        # trl/transformers fields accept these as strings too (enums, "auto"); only check plain scalars.
        if tp in (bool, int, float) or typing.get_origin(tp) in (typing.Union, types.UnionType) and all(
            a in (bool, int, float, type(None)) for a in typing.get_args(tp)
        ):
            typed[key] = _coerce(value, tp, f"{recipe.source}: train.{key}")
    return typed
