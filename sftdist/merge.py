"""`sftdist merge-adapter`: base model + LoRA adapter -> one merged model directory, shard by shard.

Gaps filled: peft's `merge_and_unload` needs the whole model in memory, and for a QLoRA adapter it
merges either into the pristine 16-bit weights (which the adapter never saw) or into a 4-bit model
that must itself fit in memory. Here each base shard is read one tensor at a time, the adapter's
delta is added (scaling * B @ A with rsLoRA and per-module rank/alpha, DoRA's magnitude, trained
full tensors such as resized embeddings), and the shard is written and freed. A QLoRA adapter is
merged into dequant(quant(W)), computed with bitsandbytes' own 4-bit round trip on exactly the
layers transformers quantizes. Everything is built in a temporary directory beside `--out`,
checked against base + adapter run through peft, and renamed into place only when it passes; the
adapter's run files (recipe, prompt style) go with it, so generation renders prompts as training did.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftdist import hub, rundir
from sftdist import safetensors_io as sio
from sftdist.errors import UserError
from sftdist.recipe import QuantizationConfig
from sftdist.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RECIPE_FILE, TRAINER_STATE
from sftdist.units import parse_size

ADAPTER_PREFIX = "base_model.model."
ADAPTER_FILES = (ADAPTER_WEIGHTS, "adapter_model.bin")
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector)$"
)
_PARTS = {
    "lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "B_bias",
    "lora_embedding_A": "A", "lora_embedding_B": "B", "lora_magnitude_vector": "magnitude",
}
# init_lora_weights values that rewrite the base weights at initialisation: the adapter fits only that rewritten base.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
# bitsandbytes' Params4bit default, which transformers uses when it quantizes a model at load time.
BNB_BLOCKSIZE = 64
VERIFY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "### Instruction:\nWrite a short poem about the sea.\n\n### Response:\n",
)
# Allowed max |logit diff| per unit of logit scale: the rounding of merged weights to the output dtype.
TOLERANCE = {"float64": 1e-6, "float32": 1e-4, "float16": 4e-3, "bfloat16": 2e-2}
_PRECISION = ("bfloat16", "float16", "float32", "float64")


@dataclass
class QuantSpec:
    """How the adapter's base was quantized in training (transformers + bitsandbytes 4-bit)."""

    quant_type: str
    double_quant: bool
    source: str  # where this came from, for the model card

    def describe(self) -> str:
        return f"{self.quant_type}, double quant {'on' if self.double_quant else 'off'}, blocksize {BNB_BLOCKSIZE}"


@dataclass
class LoraModule:
    """The adapter's tensors for one base module."""

    name: str
    parts: dict[str, Any] = field(default_factory=dict)  # A, B, B_bias, magnitude
    embedding: bool = False
    scaling: float = 0.0


@dataclass
class Adapter:
    path: Path
    weights_file: Path
    config: Any
    modules: dict[str, LoraModule]
    full: dict[str, Any]  # model parameter name -> trained full tensor (modules_to_save, resized embeddings)


@dataclass
class Layout:
    """What the base architecture says about its parameters (from a model built on the meta device)."""

    kinds: dict[str, str]  # module name -> linear | conv1d | embedding
    tied: dict[str, str]  # tied parameter -> the parameter it shares
    prefix: str
    embeddings: set[str]  # input/output embedding parameter names
    quantized: set[str]  # modules transformers turns into 4-bit layers


@dataclass
class TensorAction:
    """What happens to one base tensor."""

    kind: str = ""
    full: Any = None
    lora: LoraModule | None = None
    bias_of: LoraModule | None = None
    dequantize: bool = False


@dataclass
class MergeResult:
    out: Path
    files: list[str]
    dtype: str
    method: str
    verification: str


def merge_adapter(
    base: str,
    adapter: str,
    out: str,
    *,
    dtype: str | None = None,
    max_shard_size: str | None = None,
    device: str = "cpu",
    verify: bool = True,
    quantized_base: str | None = None,
    merge_into: str | None = None,
    allow_pickle: bool = False,
) -> MergeResult:
    """Merge ADAPTER into BASE and write the result to OUT (nothing is left in OUT on any failure)."""
    adapter_dir, out_dir = Path(adapter).expanduser(), Path(out).expanduser()
    base_dir = _check_paths(base, adapter_dir, out_dir)
    max_bytes = parse_size(max_shard_size, "--max-shard-size") if max_shard_size else None
    recipe = _read_recipe(adapter_dir)
    quant = _quant_spec(recipe, quantized_base)
    into = merge_into or ("quantized" if quant else "original")
    if into == "quantized" and quant is None:
        raise UserError(
            "--merge-into quantized: the adapter was not trained on a 4-bit base (its sftdist_recipe.yaml does not "
            "say method: qlora); pass --quantized-base nf4|fp4 if it was"
        )
    shards = sio.model_shards(base_dir, allow_pickle)
    weights = adapter_weights_file(adapter_dir, allow_pickle)
    dev = _device(device)
    shard_specs = [sio.tensor_specs(shard) for shard in shards]
    specs = {name: spec for s in shard_specs for name, spec in s.items()}
    ad = load_adapter(adapter_dir, weights)
    layout = model_layout(base_dir, quant if into == "quantized" else None)
    actions, vocab = tensor_actions(ad, layout, specs, base_dir)
    out_dtype = _out_dtype(dtype, specs)
    method = _method_line(quant, into)
    print(f"merge-adapter: {method}", flush=True)

    # Built beside --out (same filesystem, so the final rename is atomic) and renamed only once complete.
    with rundir.build_beside(out_dir) as tmp:
        files = _write_weights(shards, shard_specs, actions, tmp, quant, dtype, max_bytes, dev)
        _write_side_files(base_dir, adapter_dir, tmp, out_dtype, vocab)
        missing = sorted(set(specs) - _written_names(tmp, files))
        if missing:
            raise UserError(f"merged model lacks {len(missing)} base tensors, e.g. {missing[0]}; nothing written")
        check = "skipped (--no-verify)"
        if verify:
            check = verify_merge(base_dir, ad, tmp, quant if into == "quantized" else None, vocab, out_dtype, dev)
            print(f"merge-adapter: verification {check}", flush=True)
        card = model_card(base_dir, ad, method, out_dtype, files, check, recipe)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        rundir.copy_run_files(adapter_dir, tmp)  # the merged model renders prompts as the adapter's run did
    return MergeResult(out_dir, files, out_dtype, method, check)


def _check_paths(base: str, adapter: Path, out: Path) -> Path:
    """The base model's directory, once the adapter and --out are known to be usable: a hub id resolves
    through its cache, as training loaded it (hub.model_dir), and is fetched only after these checks."""
    if not (adapter / ADAPTER_CONFIG).is_file():
        if not adapter.exists():
            raise UserError(f"--adapter {adapter}: does not exist")
        hint = f"; did you mean {adapter / 'final'}?" if (adapter / "final" / ADAPTER_CONFIG).is_file() else ""
        raise UserError(f"--adapter {adapter}: has no {ADAPTER_CONFIG}, so it is not a peft adapter{hint}")
    rundir.check_new_dir(out, "--out")
    base_dir = hub.model_dir(base)
    if not (base_dir / "config.json").is_file():
        what = "does not exist" if not base_dir.exists() else "has no config.json, so it is not a model directory"
        raise UserError(f"--base {base_dir}: {what}")
    return base_dir


def _device(name: str) -> Any:
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a torch device; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is visible; use --device cpu")
    return dev


def _read_recipe(adapter_dir: Path) -> dict[str, Any]:
    path = rundir.run_file(adapter_dir, RECIPE_FILE)
    if path is None:
        return {}
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise UserError(f"{path}: is not valid YAML") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of recipe keys")
    return raw


def _quant_spec(recipe: dict[str, Any], flag: str | None) -> QuantSpec | None:
    """The 4-bit settings the adapter was trained against: --quantized-base wins, else the recipe's."""
    block = {**vars(QuantizationConfig()), **(recipe.get("quantization") or {})}
    if flag is not None:
        if flag == "none":
            return None
        return QuantSpec(flag, bool(block["double_quant"]), "--quantized-base")
    if recipe.get("method") != "qlora":
        return None
    if block["quant_type"] not in ("nf4", "fp4"):
        raise UserError(f"{RECIPE_FILE}: quantization.quant_type is {block['quant_type']!r}; expected nf4 or fp4")
    return QuantSpec(block["quant_type"], bool(block["double_quant"]), RECIPE_FILE)


def _method_line(quant: QuantSpec | None, into: str) -> str:
    if quant is None:
        return "lora: merged into the base weights"
    if into == "quantized":
        return (f"qlora ({quant.describe()}; from {quant.source}): merged into the dequantized 4-bit base weights, "
                "which the adapter was trained against (--merge-into original for the pristine weights)")
    return (f"qlora ({quant.describe()}; from {quant.source}): merged into the ORIGINAL unquantized base weights "
            "(--merge-into original), not the 4-bit weights the adapter was trained against")


def adapter_weights_file(adapter_dir: Path, allow_pickle: bool = False) -> Path:
    weights = next((adapter_dir / f for f in ADAPTER_FILES if (adapter_dir / f).is_file()), None)
    if weights is None:
        raise UserError(f"--adapter {adapter_dir}: has no adapter weights ({' or '.join(ADAPTER_FILES)})")
    if weights.suffix == ".bin" and not allow_pickle:
        raise UserError(
            f"{weights}: pickle weights can run code when loaded; convert them to safetensors or pass --allow-pickle"
        )
    return weights


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """A peft adapter's adapter_config.json as a mapping, or a one-line error naming it."""
    cfg_path = adapter_dir / ADAPTER_CONFIG
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{cfg_path}: is not valid JSON") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("peft_type"), str):
        raise UserError(f"{cfg_path}: expected a JSON object with a peft_type, as peft writes it")
    return raw


def load_adapter(adapter_dir: Path, weights: Path) -> Adapter:
    """Read a peft LoRA adapter and sort its tensors per base module; refuse what cannot be merged."""
    cfg_path = adapter_dir / ADAPTER_CONFIG
    raw = read_adapter_config(adapter_dir)
    if raw.get("peft_type") != "LORA":
        raise UserError(f"{cfg_path}: peft_type is {raw.get('peft_type')!r}; merge-adapter merges LORA adapters only")
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(adapter_dir))
    _refuse_unmergeable(config, cfg_path)
    modules: dict[str, LoraModule] = {}
    full: dict[str, tuple[int, Any]] = {}
    for key, tensor in sio.load_tensors(weights).items():
        if not key.startswith(ADAPTER_PREFIX):
            raise UserError(
                f"{weights}: tensor {key} does not start with {ADAPTER_PREFIX}; not a LoRA adapter of a causal LM"
            )
        name = key[len(ADAPTER_PREFIX):]
        if m := _LORA_KEY.match(name):
            mod = modules.setdefault(m["module"], LoraModule(m["module"]))
            part = m["part"]
            mod.embedding |= part.startswith("lora_embedding")
            mod.parts[_PARTS[part]] = tensor
        elif ".original_module." in name:
            continue  # peft's untouched copy beside a modules_to_save module
        elif ".lora_" in name or ".token_adapter." in name:
            raise UserError(f"{weights}: tensor {key} belongs to a LoRA feature merge-adapter does not handle")
        else:
            # Full tensors: modules_to_save copies win over saved (resized) embeddings, then base_layer copies.
            for marker, rank in ((".modules_to_save.", 2), (".base_layer.", 0)):
                if marker in name:
                    module, _, param = name.partition(marker)
                    name = f"{module}.{param}"
                    break
            else:
                rank = 1
            if name not in full or full[name][0] < rank:
                full[name] = (rank, tensor)
    for mod in modules.values():
        _check_parts(mod, config, weights)
    return Adapter(adapter_dir, weights, config, modules, {k: t for k, (_, t) in full.items()})


def _refuse_unmergeable(config: Any, where: Path) -> None:
    import dataclasses

    for f in dataclasses.fields(config):
        if f.metadata.get("is_lora_variant") and f.name != "use_dora" and getattr(config, f.name):
            raise UserError(f"{where}: {f.name} is set; merge-adapter merges plain LoRA, rsLoRA and DoRA only")
    for name in ("target_parameters", "layer_replication", "trainable_token_indices", "use_qalora", "lora_ga_config"):
        if getattr(config, name, None):
            raise UserError(f"{where}: {name} is set; merge-adapter merges plain LoRA, rsLoRA and DoRA only")
    init = config.init_lora_weights
    if init == "mica":  # a LoRA variant chosen through init_lora_weights
        raise UserError(f"{where}: init_lora_weights=mica is a LoRA variant; merge-adapter merges LoRA, rsLoRA, DoRA")
    if isinstance(init, str) and init.startswith(BASE_REWRITING_INITS):
        raise UserError(
            f"{where}: init_lora_weights={init} rewrote the base weights when training started, so this adapter fits "
            "only that rewritten base; save it as plain LoRA (peft's path_initial_model_for_weight_conversion) first"
        )


def _check_parts(mod: LoraModule, config: Any, weights: Path) -> None:
    """Both factors present, DoRA magnitude iff use_dora, and the scaling peft gives this module."""
    import math

    from peft.utils.other import get_pattern_key

    if "A" not in mod.parts or "B" not in mod.parts:
        raise UserError(f"{weights}: module {mod.name} has only one of its LoRA factors A and B")
    if ("magnitude" in mod.parts) != bool(config.use_dora):
        has = "has" if "magnitude" in mod.parts else "lacks"
        raise UserError(f"{weights}: {mod.name} {has} a DoRA magnitude, but adapter_config has use_dora={config.use_dora}")
    if mod.embedding and "magnitude" in mod.parts:
        raise UserError(f"{weights}: DoRA on the embedding {mod.name} is not supported by merge-adapter")
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), mod.name), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), mod.name), config.lora_alpha)
    if mod.parts["A"].shape[0] != r:
        rank = mod.parts["A"].shape[0]
        raise UserError(f"{weights}: {mod.name} has LoRA rank {rank}, but adapter_config.json says r={r}")
    mod.scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r


def model_layout(base_dir: Path, quant: QuantSpec | None) -> Layout:
    """Layer types, tied weights and (for QLoRA) the 4-bit layers, from the base built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        config = AutoConfig.from_pretrained(str(base_dir))
        if getattr(config, "quantization_config", None):
            raise UserError(f"--base {base_dir}: is already quantized (config.json has quantization_config); "
                            "use the unquantized base")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--base {base_dir}: transformers cannot build this model ({why})") from None
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
        elif isinstance(module, torch.nn.Embedding):
            kinds[name] = "embedding"
    names = {id(m): n for n, m in model.named_modules()}
    io = (model.get_input_embeddings(), model.get_output_embeddings())
    embeddings = {f"{names[id(m)]}.weight" for m in io if m is not None}
    layout = Layout(kinds, dict(model.all_tied_weights_keys), model.base_model_prefix, embeddings, set())
    if quant is not None:
        import bitsandbytes as bnb
        from transformers.integrations import replace_with_bnb_linear
        from transformers.quantizers.base import HfQuantizer

        # transformers' own choice of layers to quantize (it skips the LM head, tied and fp32-kept modules); the
        # fp32-kept list is a private attribute of the model class, which transformers' quantizers read the same way.
        skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
        replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=_bnb_config(quant))
        layout.quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    return layout


def _bnb_config(quant: QuantSpec) -> Any:
    import torch

    from sftdist.model import bnb_4bit_config

    return bnb_4bit_config(quant.quant_type, quant.double_quant, torch.float32)


def tensor_actions(
    ad: Adapter, layout: Layout, specs: dict[str, tuple[tuple[int, ...], str]], base_dir: Path
) -> tuple[dict[str, TensorAction], int | None]:
    """Map every adapter tensor onto a base tensor and check shapes, before anything is written.

    Returns what happens to each base tensor and the new vocabulary size when the adapter carries
    resized embeddings.
    """

    def base_key(param: str) -> str | None:
        for cand in (param, param.removeprefix(layout.prefix + "."), f"{layout.prefix}.{param}"):
            if cand in specs:
                return cand
        return None

    where = ad.weights_file
    actions: dict[str, TensorAction] = {}
    for mod in ad.modules.values():
        kind = layout.kinds.get(mod.name)
        if kind is None:
            raise UserError(
                f"{where}: LoRA targets {mod.name}, which the base model {base_dir} does not have (another model's adapter?)"
            )
        if mod.embedding != (kind == "embedding"):
            raise UserError(f"{where}: LoRA layout of {mod.name} does not fit its {kind} layer in the base")
        param = f"{mod.name}.weight"
        key = base_key(param)
        if key is None:
            if param in layout.tied:
                raise UserError(
                    f"{where}: LoRA on {mod.name}, whose weight the base ties to {layout.tied[param]}; a merge would change both"
                )
            raise UserError(f"--base {base_dir}: has no tensor {param} for the adapter's LoRA on {mod.name}")
        action = actions.setdefault(key, TensorAction())
        action.kind, action.lora = kind, mod
        if "B_bias" in mod.parts:
            bias_key = base_key(f"{mod.name}.bias")
            if bias_key is None:
                raise UserError(f"{where}: {mod.name} has lora_bias, but its base layer has no bias to merge it into")
            actions.setdefault(bias_key, TensorAction()).bias_of = mod
    for param, tensor in ad.full.items():
        key = base_key(param)
        if key is None:
            source = layout.tied.get(param)
            if source is not None and source in ad.full and ad.full[source].equal(tensor):
                continue  # the tied copy of a trained embedding
            if source is not None:
                raise UserError(
                    f"{where}: holds a trained {param}, but the base ties it to {source}; one merged tensor cannot be both"
                )
            raise UserError(f"{where}: holds a full tensor {param}, which the base model {base_dir} does not have")
        actions.setdefault(key, TensorAction()).full = tensor
    for module in layout.quantized:
        key = base_key(f"{module}.weight")
        if key is not None:
            action = actions.setdefault(key, TensorAction())
            action.kind, action.dequantize = layout.kinds[module], True
    vocab = _check_shapes(actions, specs, {base_key(p) for p in layout.embeddings}, ad.weights_file)
    return actions, vocab


def _check_shapes(actions: dict[str, TensorAction], specs: dict, embedding_keys: set, where: Path) -> int | None:
    vocab: int | None = None
    for key, action in actions.items():
        shape = specs[key][0]
        if action.full is not None:
            got = tuple(action.full.shape)
            if got != shape:
                if key not in embedding_keys or got[1:] != shape[1:]:
                    raise UserError(f"{where}: {key} has shape {got}, but the base's {key} has shape {shape}")
                if vocab not in (None, got[0]):
                    raise UserError(f"{where}: input and output embeddings resized to different sizes ({vocab}, {got[0]})")
                vocab = got[0]
            shape = got
        if action.lora is not None:
            a, b = action.lora.parts["A"], action.lora.parts["B"]
            out_in = (b.shape[0], a.shape[1])
            want = out_in[::-1] if action.kind in ("conv1d", "embedding") else out_in
            if want != shape:
                raise UserError(
                    f"{where}: LoRA on {action.lora.name} gives a delta of shape {want}, but base {key} has shape {shape}"
                )
            mag = action.lora.parts.get("magnitude")
            if mag is not None and tuple(mag.shape) != (out_in[0],):
                got = tuple(mag.shape)
                raise UserError(f"{where}: DoRA magnitude of {action.lora.name} has shape {got}, expected ({out_in[0]},)")
        if action.bias_of is not None:
            got = tuple(action.bias_of.parts["B_bias"].shape)
            if got != shape:
                raise UserError(f"{where}: lora_B bias of {action.bias_of.name} has shape {got}, base {key} has {shape}")
    return vocab


def _out_dtype(dtype: str | None, specs: dict) -> str:
    """The least precise float dtype of the output (what the verification tolerance must allow for)."""
    floats = {d for _, d in specs.values() if d in _PRECISION}
    if dtype:
        return dtype
    return min(floats, key=_PRECISION.index) if floats else "float32"


def merged_tensor(
    tensor: Any, action: TensorAction | None, quant: QuantSpec | None, dtype: str | None, device: Any
) -> Any:
    """One output tensor: the base (or the adapter's full copy), 4-bit round trip, LoRA/DoRA, cast."""
    import torch

    is_float = str(tensor.dtype).removeprefix("torch.") in _PRECISION
    target = getattr(torch, dtype) if dtype and is_float else tensor.dtype
    if action is None:
        return tensor.to(target)
    w = action.full if action.full is not None else tensor
    if action.lora is None and action.bias_of is None and not action.dequantize:
        return w.to(target)
    # A private float32 copy (the base tensor was just read; the adapter's must not change): merged in place.
    w = w.to(device=device, dtype=torch.float32, copy=action.full is not None)
    if action.dequantize:
        w = quant_round_trip(w, quant, transposed=action.kind == "conv1d")
    if action.lora is not None:
        w = _add_lora(w, action.lora, action.kind)
    if action.bias_of is not None:
        w.add_(action.bias_of.parts["B_bias"].to(device, torch.float32), alpha=action.bias_of.scaling)
    return w.to(device="cpu", dtype=target)


def quant_round_trip(w: Any, quant: QuantSpec, transposed: bool = False) -> Any:
    """dequant(quant(W)) as bitsandbytes computes it for a 4-bit layer (Conv1D weights are quantized transposed).

    W is quantized from its stored values in float32. Training quantized them in the compute dtype: the same
    values for a bf16-stored base; for an fp32 base trained in bf16, a code may differ where bf16 rounding
    crossed a 4-bit boundary.
    """
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    src = (w.T if transposed else w).contiguous()
    packed, state = quantize_4bit(
        src, blocksize=BNB_BLOCKSIZE, compress_statistics=quant.double_quant, quant_type=quant.quant_type
    )
    deq = dequantize_4bit(packed, state).float()
    return deq.T if transposed else deq


def _add_lora(w: Any, mod: LoraModule, kind: str) -> Any:
    """W += scaling * B @ A in place, in the layer's own orientation; DoRA then rescales each output row.

    In place (addmm_) because a W-sized temporary per layer is what the heap would keep after the merge.
    """
    import torch

    a = mod.parts["A"].to(w.device, torch.float32)
    b = mod.parts["B"].to(w.device, torch.float32)
    # Linear stores (out, in); Conv1D stores (in, out) and lora_embedding_A/B are (r, vocab)/(dim, r): (B @ A).T.
    out_rows = kind == "linear"
    if out_rows:
        w.addmm_(b, a, alpha=mod.scaling)
    else:
        w.addmm_(a.T, b.T, alpha=mod.scaling)
    if "magnitude" in mod.parts:
        norm = torch.linalg.norm(w, dim=1 if out_rows else 0)
        factor = mod.parts["magnitude"].to(w.device, torch.float32) / norm
        w.mul_(factor.unsqueeze(1) if out_rows else factor.unsqueeze(0))
    return w


def _write_weights(
    shards: list[Path], shard_specs: list[dict], actions: dict[str, TensorAction], out: Path,
    quant: QuantSpec | None, dtype: str | None, max_bytes: int | None, device: Any,
) -> list[str]:
    """Stream every base shard through `merged_tensor` into the output shards (planned up front)."""
    import gc

    groups = [[_out_entry(name, spec, actions.get(name), dtype) for name, spec in specs.items()] for specs in shard_specs]
    if max_bytes is not None:
        groups = sio.split_by_size([e for g in groups for e in g], max_bytes)
    writer = sio.ShardWriter(out, groups)
    try:
        for i, (shard, specs) in enumerate(zip(shards, shard_specs), start=1):
            touched = 0
            for name, tensor in sio.shard_tensors(shard, list(specs)):
                action = actions.get(name)
                touched += action is not None
                writer.write(name, merged_tensor(tensor, action, quant, dtype, device))
                del tensor
            gc.collect()
            print(f"merge-adapter: shard {i}/{len(shards)} {shard.name}: {touched} tensors changed", flush=True)
    finally:
        writer.close()
    return writer.finish()


def _out_entry(
    name: str, spec: tuple[tuple[int, ...], str], action: TensorAction | None, dtype: str | None
) -> sio.TensorInfo:
    shape, stored = spec
    if action is not None and action.full is not None:
        shape = tuple(action.full.shape)
    return name, shape, dtype if dtype and stored in _PRECISION else stored


def _written_names(out: Path, files: list[str]) -> set[str]:
    names: set[str] = set()
    for f in files:
        names.update(sio.tensor_specs(out / f))
    return names


def _write_side_files(base: Path, adapter: Path, out: Path, dtype: str, vocab: int | None) -> None:
    """config.json (dtype, vocab, no quantization), generation config and tokenizer: the adapter's if it has them."""
    cfg_src = adapter / "config.json" if (adapter / "config.json").is_file() else base / "config.json"
    config = json.loads(cfg_src.read_text(encoding="utf-8"))
    config.pop("quantization_config", None)  # a QLoRA run's config describes its 4-bit base, not this model
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    if vocab is not None:
        config["vocab_size"] = vocab
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for src in (adapter, base):
        if (src / rundir.GENERATION_CONFIG).is_file():
            shutil.copy2(src / rundir.GENERATION_CONFIG, out / rundir.GENERATION_CONFIG)
            break
    rundir.copy_tokenizer(adapter if any((adapter / f).is_file() for f in rundir.TOKENIZER_FILES) else base, out)


def _prompt_ids(model_dir: Path, vocab: int) -> list[Any]:
    import torch

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        ids = [tok(p, return_tensors="pt").input_ids for p in VERIFY_PROMPTS]
        if all(x.shape[1] > 0 for x in ids):
            return ids
    except (OSError, ValueError):
        pass  # no usable tokenizer: fixed token ids test the weights just as well
    return [(torch.arange(16) * (i + 1) + 1).remainder(vocab).unsqueeze(0) for i in range(3)]


def verify_merge(
    base: Path, ad: Adapter, merged: Path, quant: QuantSpec | None, vocab: int | None, dtype: str, device: Any = None
) -> str:
    """Logits of the merged model vs base + adapter through peft, one model at a time, on `device` (the merge's).

    For QLoRA the reference base is quantized by transformers and dequantized by bitsandbytes, independently of
    `quant_round_trip`. Every model is placed on `device` explicitly: left to itself, transformers puts a 4-bit
    model on the current CUDA device wherever one is visible, even for a CPU merge, and then the CPU prompts meet
    CUDA weights. The 4-bit reference is dequantized as a whole only on the CPU; on a GPU its layers compute from
    the 4-bit weights (bitsandbytes dequantizes one layer at a time for a prompt of several tokens), so the GPU
    never holds the fp32 base (280 GB for 70B).
    """
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = torch.device("cpu") if device is None else device
    kwargs: dict[str, Any] = {"dtype": torch.float32, "device_map": {"": device}}
    if quant is not None:
        kwargs["quantization_config"] = _bnb_config(quant)
    ref = AutoModelForCausalLM.from_pretrained(str(base), **kwargs)
    if quant is not None and device.type == "cpu":
        # bitsandbytes' CPU inference kernel rounds the 4-bit scales to bf16; dequantized layers compute exactly.
        ref = ref.dequantize()
    n_vocab = vocab or ref.get_input_embeddings().weight.shape[0]
    if ref.get_input_embeddings().weight.shape[0] != n_vocab:
        ref.resize_token_embeddings(n_vocab, mean_resizing=False)
    ref = PeftModel.from_pretrained(ref, str(ad.path), torch_device=str(device)).eval()
    prompts = [ids.to(device) for ids in _prompt_ids(merged, n_vocab)]
    with torch.no_grad():
        want = [ref(ids).logits.float().cpu() for ids in prompts]
        with ref.disable_adapter():
            plain = [ref(ids).logits.float().cpu() for ids in prompts]
    del ref
    gc.collect()
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32, device_map={"": device}).eval()
    with torch.no_grad():
        got = [model(ids).logits.float().cpu() for ids in prompts]
    del model
    gc.collect()
    diff = max((g - w).abs().max().item() for g, w in zip(got, want))
    effect = max((w - p).abs().max().item() for w, p in zip(want, plain))
    tol = TOLERANCE[dtype] * max(1.0, max(w.abs().max().item() for w in want))
    against = "dequantized 4-bit base + adapter" if quant else "base + adapter"
    if not diff <= tol:
        raise UserError(
            f"verification failed: merged logits differ from {against} (peft) by {diff:.3g} > tolerance {tol:.3g}; "
            "nothing written"
        )
    note = "" if effect > tol else "; the adapter moves logits by less than the tolerance, so this check cannot see it"
    return (f"passed: max |logit diff| vs {against} (peft) = {diff:.3g} <= tolerance {tol:.3g} ({dtype}) on "
            f"{len(prompts)} prompts; the adapter moves logits by up to {effect:.3g}{note}")


def _training_summary(adapter_dir: Path) -> list[str]:
    path = rundir.run_file(adapter_dir, TRAINER_STATE)
    if path is None:
        return ["- training: no trainer_state.json beside the adapter"]
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return [f"- training: {path} is not valid JSON"]
    lines = [f"- training steps: {state.get('global_step')}"]
    for key in ("loss", "eval_loss"):
        entries = [e for e in state.get("log_history", []) if key in e]
        if entries:
            lines.append(f"- final {key.replace('_', ' ')}: {entries[-1][key]:.4f} (step {entries[-1].get('step')})")
    return lines


def model_card(
    base: Path, ad: Adapter, method: str, dtype: str, files: list[str], check: str, recipe: dict[str, Any]
) -> str:
    """README.md for the merged model: where it came from, how it was merged, how it was checked."""
    c = ad.config
    lora = f"r={c.r}, alpha={c.lora_alpha}{', rsLoRA' if c.use_rslora else ''}{', DoRA' if c.use_dora else ''}"
    if c.rank_pattern or c.alpha_pattern:
        lora += f", rank_pattern={c.rank_pattern}, alpha_pattern={c.alpha_pattern}"
    lines = [
        "# Merged model", "",
        "Written by `sftdist merge-adapter`.", "",
        f"- base: `{base.resolve()}`",
        f"- adapter: `{ad.path.resolve()}` ({len(ad.modules)} LoRA modules: {lora}; "
        f"{len(ad.full)} full tensors from the adapter)",
        f"- method: {method}",
        f"- weights: {dtype}, {len(files)} file(s)",
        *_training_summary(ad.path),
        f"- verification: {check}",
    ]
    if recipe:
        lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"
