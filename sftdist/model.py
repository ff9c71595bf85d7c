"""Tokenizer (pad != eos, chat template), model (dtype, attention), 4-bit quantization, LoRA config.

Gaps filled: trl falls back to pad = eos when a tokenizer has none (GPT-2, Llama), which masks the
EOS out of the loss wherever padding is used and yields a model that never stops; here a distinct
pad token is added instead. trl also does not refuse an attention implementation that cannot keep
packed samples apart; here packing is refused for those.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sftdist import distributed, hub
from sftdist.errors import UserError
from sftdist.recipe import Recipe

# Implementations that honour per-sample position_ids in a padding-free packed row: flash attention
# takes cu_seqlens; sdpa/eager get a block-diagonal mask from transformers when the KV cache is off.
PACKING_SAFE_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "sftdist_varlen")
PAD_TOKEN = "<|pad|>"


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_model_path(name_or_path: str) -> None:
    """A local path must be a model directory; anything else must look like a hub id, and whether the hub can
    be reached is settled before any library asks it (a library would retry for ~26 s)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{p}: directory has no config.json, so it is not a model directory")
        return
    if p.exists() or not hub.looks_like_hub_id(name_or_path):
        raise UserError(f"{name_or_path}: model path does not exist")
    hub.unreachable()


def require_safetensors(model_dir: str) -> bool | None:
    """Refuse a local directory that holds only pickle weights (.bin can run code when loaded); the
    result is `use_safetensors` for from_pretrained (None for a hub id: transformers prefers them)."""
    p = Path(model_dir)
    if not p.is_dir():
        return None
    suffixes = {f.suffix for f in p.iterdir() if f.suffix in (".safetensors", ".bin")}
    if suffixes == {".bin"}:
        raise UserError(
            f"{model_dir}: holds only pickle weights (.bin), which can run code when loaded; "
            "convert them to safetensors first"
        )
    return True if suffixes else None


def load_tokenizer(recipe: Recipe) -> Any:
    """The tokenizer with a pad token distinct from EOS and the chat template the recipe asks for."""
    from transformers import AutoTokenizer

    m = recipe.model
    check_model_path(m.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
    except OSError as e:
        raise hub.offline_error(m.name_or_path, "its tokenizer") or UserError(
            f"{m.name_or_path}: could not load a tokenizer ({str(e).splitlines()[0]})"
        ) from None
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    from sftdist.data.chat import set_chat_template

    set_chat_template(tok, recipe.data.chat_template, recipe.source)
    return tok


def model_context_length(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def resolve_dtype(name: str, where: str, trainable: bool = False) -> Any:
    """'auto' -> fp32 for weights that train (bf16 autocast computes, AdamW keeps fp32 masters) and on
    CPU; bf16 for frozen weights on a GPU that has it. fp16 on CPU is refused."""
    import torch

    cuda = has_cuda()
    if name == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() and not trainable else torch.float32
    if name == "float16" and not cuda:
        raise UserError(f"{where} is float16, but no GPU is visible and CPUs do not train in float16; use auto")
    if name == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(f"{where} is bfloat16, but this GPU lacks bf16; use float16 or auto")
    return getattr(torch, name)


# `auto`'s order: the fastest implementation first. Each entry: the name, the model-class flag that says
# transformers implements it for that class, and whether this machine can run it.
AUTO_ATTENTION: tuple[tuple[str, str, Any], ...] = (
    ("flash_attention_2", "_supports_flash_attn", lambda: _flash_available("flash_attention_2")),
    ("sdpa", "_supports_sdpa", lambda: True),
    ("eager", "", lambda: True),
)


# Model types whose transformers code builds the sdpa/eager mask without position_ids, so that a packed, padding-free
# row is one causal sequence there: only flash attention (cu_seqlens) keeps its samples apart.
# tests/test_families.py shows each entry still leaks.
MASK_WITHOUT_POSITIONS = ("gpt_oss",)


def _flash_available(impl: str) -> bool:
    """Whether transformers can run flash attention `impl` here (on a GPU it falls back to the hub's kernels)."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    check = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}[impl]
    return check(kernels_fallback_ok=has_cuda())


def model_class(config: Any) -> Any:
    """The causal-LM class transformers builds for `config` (no weights), or None when it has no such class."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping.get(type(config), None)


def class_supports(cls: Any, impl: str) -> bool:
    """Whether transformers implements attention `impl` for model class `cls` (unknown classes: assumed yes)."""
    flag = next((f for name, f, _ in AUTO_ATTENTION if name == impl), "_supports_flash_attn" if "flash" in impl else "")
    return cls is None or not flag or bool(getattr(cls, flag, True))


def resolve_attention(recipe: Recipe, config: Any = None, say: bool = False) -> str:
    """model.attn_implementation as transformers will load it. `auto`: the first of AUTO_ATTENTION this machine
    runs and the model class implements (all keep packed samples apart); with `say`, one line names it when the
    class ruled out a faster one. An explicit choice the class or the machine cannot run is a UserError
    (preflight calls this, so it is refused before anything is written)."""
    if config is None:
        try:
            config = load_config(recipe)
        except UserError:  # reported by the check that reads the model; here every implementation is assumed
            config = None
    cls = model_class(config) if config is not None else None
    impl = recipe.model.attn_implementation
    if impl == "auto":
        runnable = [(name, flag) for name, flag, here in AUTO_ATTENTION if here()]
        impl = next(name for name, _ in runnable if class_supports(cls, name))
        if say and impl != runnable[0][0] and os.environ.get("RANK", "0") == "0":
            print(f"sftdist: attention {impl}: {cls.__name__} does not implement {runnable[0][0]}", flush=True)
        if impl == "sdpa" and recipe.data.packing and recipe.sequence_parallel == 1:
            from sftdist import packed_attention  # torch's varlen kernel on a GPU: no row^2 mask (packed_attention.py)

            if packed_attention.kernel() is not None:
                impl = packed_attention.register()
    if impl in ("flash_attention_2", "flash_attention_3") and not _flash_available(impl):
        package = "flash-attn" if impl == "flash_attention_2" else "flash-attn 3 (flash_attn_interface)"
        where = "no GPU is visible" if not has_cuda() else f"{package} is not installed"
        raise UserError(
            f"{recipe.source}: model.attn_implementation={impl} needs a CUDA GPU and {package}, but {where}; "
            "use auto or sdpa"
        )
    if not class_supports(cls, impl):
        raise UserError(
            f"{recipe.source}: model.attn_implementation={impl} is not implemented by {cls.__name__} "
            f"({recipe.model.name_or_path}); use auto"
        )
    model_type = config.get_text_config().model_type if config is not None else None
    if recipe.data.packing and "flash" not in impl and model_type in MASK_WITHOUT_POSITIONS:
        raise UserError(
            f"{recipe.source}: data.packing needs flash attention for {model_type} models (transformers builds their "
            f"{impl} mask without the samples' positions, so packed samples would attend to each other); "
            "set data.packing: false, or train on a GPU with flash-attn"
        )
    if recipe.data.packing and impl not in PACKING_SAFE_ATTENTION:
        raise UserError(
            f"{recipe.source}: model.attn_implementation={impl} cannot keep packed samples from attending to "
            f"each other; use one of {', '.join(PACKING_SAFE_ATTENTION)} or set data.packing: false"
        )
    return impl


def bnb_4bit_config(quant_type: str, double_quant: bool, compute_dtype: Any, storage_dtype: Any = None) -> Any:
    """transformers' BitsAndBytesConfig for 4-bit weights, as training loads them and merge-adapter rebuilds them."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        **({"bnb_4bit_quant_storage": storage_dtype} if storage_dtype is not None else {}),
    )


def quantization_config(recipe: Recipe, skip: list[str] | None = None) -> Any:
    """The recipe's 4-bit config; the packed weights are stored in the compute dtype when FSDP2/ZeRO-3
    must shard them (they only shard floating-point tensors), else in uint8 (bitsandbytes' default)."""
    q = recipe.quantization
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # bitsandbytes raises assorted errors when it has no backend
        raise UserError(f"method: qlora needs bitsandbytes with 4-bit support, which failed to load ({e})") from None
    import torch

    compute = resolve_dtype(q.compute_dtype, f"{recipe.source}: quantization.compute_dtype")
    if q.storage_dtype == "auto":
        storage = compute if distributed.shards_parameters() else torch.uint8
    else:
        storage = getattr(torch, q.storage_dtype)
    config = bnb_4bit_config(q.quant_type, q.double_quant, compute, storage)
    config.llm_int8_skip_modules = skip
    return config


# The block bitsandbytes' 4-bit kernels quantize by: a layer with fewer outputs (a 1-wide expert gate) stays unquantized.
SMALLEST_4BIT_OUTPUTS = 32


def unquantized_modules(model: Any) -> list[str]:
    """Modules QLoRA keeps in the compute dtype: what transformers keeps by default (the output layer, tied
    weights), plus MoE routers and expert gates (ROUTER_NAMES) and Linear layers too small for 4-bit."""
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert

    own = [
        name for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
        and (name.rsplit(".", 1)[-1] in ROUTER_NAMES or mod.out_features < SMALLEST_4BIT_OUTPUTS)
    ]
    return sorted({*get_keys_to_not_convert(model), *own})


_UNQUANTIZED: dict[tuple[str, bool], list[str]] = {}


def unquantized_modules_of(recipe: Recipe) -> list[str]:
    """`unquantized_modules` of the recipe's model, counted once per process on the meta device. preflight asks
    first: once the SFTConfig exists, its ZeRO-3 config would make transformers build the meta model as partitions."""
    key = (recipe.model.name_or_path, recipe.model.trust_remote_code)
    if key not in _UNQUANTIZED:
        _UNQUANTIZED[key] = unquantized_modules(meta_model(recipe)[1])
    return _UNQUANTIZED[key]


def check_cpu_4bit(model: Any, where: str) -> None:
    """bitsandbytes' CPU 4-bit kernels (used in eval and generation) need output sizes divisible by 32;
    without this check the run trains, then fails at its first evaluation."""
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_state.shape[0] % 32:
            raise UserError(
                f"{where}: method qlora on CPU needs layer output sizes divisible by 32 (bitsandbytes' CPU "
                f"kernels), but {name} has {module.weight.quant_state.shape[0]}; use method: lora, or a GPU"
            )


# Leaf names of MoE routers and expert gates: never LoRA targets, never quantized (peers keep them in full precision:
# a 4-bit router misroutes tokens, and a LoRA on it shifts the load balance the aux loss keeps).
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def is_moe(config: Any) -> bool:
    """A mixture-of-experts model: transformers gives every MoE config `output_router_logits`."""
    return hasattr(config.get_text_config(), "output_router_logits")


def moe_linear_targets(model: Any) -> list[str]:
    """`all-linear` on an MoE model: every Linear/Conv1D but the output layer and the routers, and but those
    peft's transformers-v5 remap would move onto the fused experts (deepseek's dense MLP shares their names).

    peft's own `all-linear` adds the routers and the fused expert parameters (as parameters, which refuse
    lora.dropout != 0); the experts are targeted by lora.target_parameters instead (docs/architectures.md)."""
    import torch
    from peft import LoraConfig
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = sorted(
        name for name, mod in model.named_modules()
        if isinstance(mod, (torch.nn.Linear, Conv1D)) and mod is not head and name.rsplit(".", 1)[-1] not in ROUTER_NAMES
    )
    probe = LoraConfig(target_modules=names, task_type="CAUSAL_LM")
    convert_peft_config_for_transformers(probe, model=model, conversions=None)  # the remap get_peft_model applies
    return sorted(set(probe.target_modules or ()))


def lora_config(recipe: Recipe, model: Any = None) -> Any:
    """peft's LoraConfig of the recipe; `all-linear` on an MoE `model` is resolved by `moe_linear_targets`."""
    from peft import LoraConfig

    lc = recipe.lora
    targets = lc.target_modules
    if targets == "all-linear" and model is not None and is_moe(unwrapped(model).config):
        targets = moe_linear_targets(unwrapped(model))
    return LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=targets,
        target_parameters=lc.target_parameters,
        use_dora=lc.use_dora,
        use_rslora=lc.use_rslora,
        task_type="CAUSAL_LM",
    )


def load_config(recipe: Recipe) -> Any:
    """The recipe's model's config.json (no weights)."""
    m = recipe.model
    return read_config(m.name_or_path, m.trust_remote_code, f"unless {recipe.source} sets model.trust_remote_code: true")


def read_config(name_or_path: str, trust_remote_code: bool = False, allow: str = "") -> Any:
    """A model's config.json (no weights), with one-line errors for what users get wrong: a missing
    or cut-off file, an unknown model type, code the config needs to run (`allow` says how to allow it).
    A hub id that neither the hub nor its cache gives reads the published copy sftdist ships, if any
    (`hub.shipped_config`); `config.name_or_path` then names that copy."""
    from transformers import AutoConfig

    check_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise UserError(
                f"{name_or_path}: config.json needs the model's own Python code (auto_map), which sftdist does not "
                f"run{' ' + allow if allow else ''}"
            ) from None
        shipped = hub.shipped_config(name_or_path)
        if shipped is not None:
            return AutoConfig.from_pretrained(shipped)
        raise hub.offline_error(name_or_path, "its config.json") or UserError(
            f"{name_or_path}: could not read config.json ({str(e).strip().splitlines()[0]})"
        ) from None


def check_weights(model_dir: Path) -> None:
    """A local model directory holds weights, and every safetensors file among them is whole."""
    from sftdist import safetensors_io as sio

    for shard in sio.model_shards(model_dir, allow_pickle=True):  # pickle-only: `require_safetensors` refuses
        if shard.suffix == ".safetensors":
            sio.tensor_specs(shard)


def check_local_weights(name_or_path: str) -> None:
    """`check_weights` for a local model directory (a hub id's weights are the hub's and its cache's business)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        check_weights(p)


def meta_model(recipe: Recipe) -> tuple[Any, Any]:
    """(config, model) with every tensor on the meta device: shapes only, no weights read or allocated.
    What preflight checks LoRA's target modules on and the planner counts parameters of."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(recipe)
    try:
        with torch.device("meta"):
            return config, AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{recipe.model.name_or_path}: cannot build a causal LM from its config.json ({msg})") from None


def with_lora(model: Any, recipe: Recipe) -> Any:
    """The model wrapped by peft exactly as training wraps it (same LoraConfig), still on the meta device."""
    import warnings

    import torch
    from peft import get_peft_model

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. fan_in_fan_out notes for Conv1D: this is a count, not a run
        try:
            return get_peft_model(model, lora_config(recipe, model))
        except ValueError as e:
            raise UserError(f"{recipe.source}: lora: {str(e).splitlines()[0]}") from None


def check_context(recipe: Recipe, config: Any) -> None:
    """data.max_length must fit the model's context (position embeddings beyond it do not exist)."""
    ctx = model_context_length(config)
    if ctx is not None and recipe.data.max_length > ctx:
        raise UserError(
            f"{recipe.source}: data.max_length={recipe.data.max_length} is above the context of "
            f"{recipe.model.name_or_path} ({ctx} tokens); lower data.max_length"
        )


def load_model(recipe: Recipe, tokenizer: Any) -> Any:
    """The model in the recipe's dtype and attention, resized for an added pad token."""
    from transformers import AutoModelForCausalLM

    m = recipe.model
    check_context(recipe, load_config(recipe))
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(m.dtype, f"{recipe.source}: model.dtype", trainable=recipe.method == "full"),
        "attn_implementation": resolve_attention(recipe, say=True),
        "trust_remote_code": m.trust_remote_code,
    }
    if recipe.method == "qlora":
        kwargs["quantization_config"] = quantization_config(recipe, unquantized_modules_of(recipe))
        kwargs["dtype"] = kwargs["quantization_config"].bnb_4bit_compute_dtype
    model = AutoModelForCausalLM.from_pretrained(
        m.name_or_path, use_safetensors=require_safetensors(m.name_or_path), **kwargs
    )
    if recipe.method == "qlora" and not has_cuda():
        check_cpu_4bit(model, m.name_or_path)
    mark_zero3_leaf_modules(model)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # weight.shape is 0 under ZeRO-3
        # Pad to a multiple of 64: matmuls on the embedding/LM head run faster on GPUs.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # the KV cache would let packed samples attend to each other
    gc = model.generation_config
    if gc is not None:
        gc.pad_token_id = tokenizer.pad_token_id
        eos = [gc.eos_token_id] if isinstance(gc.eos_token_id, int) else list(gc.eos_token_id or [])
        if tokenizer.eos_token_id not in eos:
            eos.insert(0, tokenizer.eos_token_id)
        gc.eos_token_id = eos[0] if len(eos) == 1 else eos
    return model


def mark_zero3_leaf_modules(model: Any) -> None:
    """Under ZeRO-3, each sparse MoE block is gathered whole (DeepSpeed's leaf modules, as LLaMA-Factory does):
    ranks that route their tokens to different experts would otherwise wait on each other's gathers and hang."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from sftdist.moe import sparse_block_classes

    blocks = sparse_block_classes(model) if is_deepspeed_zero3_enabled() else []
    if blocks:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, blocks)
        if os.environ.get("RANK", "0") == "0":
            print(f"sftdist: ZeRO-3 gathers each {', '.join(c.__name__ for c in blocks)} whole (leaf module)", flush=True)


def unwrapped(model: Any) -> Any:
    """The transformers model inside a peft wrapper (or `model` itself)."""
    from accelerate.utils import is_peft_model

    return model.get_base_model() if is_peft_model(model) else model
