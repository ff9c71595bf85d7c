"""`sftdist plan`: config.json -> parameter counts -> per-GPU memory per strategy -> recommendation.

Gap filled: accelerate's `estimate-memory` counts weights and Adam on one device, and DeepSpeed's
`estimate_zero{2,3}_model_states_mem_needs` cover full fine-tuning under ZeRO; none of them knows
LoRA/QLoRA, FSDP2, activations, or the dtypes trl and accelerate actually train in. Here the model is
built on the `meta` device (config.json only, no weights read) and wrapped by peft with the recipe's
LoRA settings, so counts follow any architecture and any `target_modules` exactly as training will.

The bytes-per-parameter accounting, the activation formula and the speed order are derived and
sourced in docs/plan.md; the comments below say which library behaviour each number follows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from sftdist.errors import UserError
from sftdist.recipe import Recipe, with_train
from sftdist.strategies import DEEPSPEED, STRATEGIES, config_paths, deepspeed_json
from sftdist.units import GiB, gib

CUDA_RESERVE = 1 * GiB  # CUDA context, cuBLAS/NCCL workspaces: never usable by tensors
# Allocator fragmentation and communication buffers grow with the job: a share of the tensors' peak,
# larger where parameters are gathered and freed in every layer (fitted to the calibration table, docs/plan.md).
FRAGMENTATION = {"zero3": 0.12, "zero3-offload": 0.12, "fsdp2": 0.12}
FRAGMENTATION_DEFAULT = 0.05
# The calibration table's spread: a plan within this share of the GPU is "tight", not "fits".
UNCERTAINTY = 0.10
# Planned / measured peak over the published runs of docs/plan.md's calibration (tests/plan_calibration.py).
CALIBRATED_BAND = (0.90, 1.40)
# trl's fused LM head (add_fused_lm_head) scores tiles of 1024 tokens x 32768 vocabulary entries in fp32.
LOGPROB_TILE_TOKENS, LOGPROB_TILE_VOCAB = 1024, 32768
PER_TOKEN_OUTPUTS = 16  # fp32 log-prob, entropy, top-1 and log-sum-exp per token from that head
NF4_BLOCK, NF4_DOUBLE_BLOCK = 64, 256  # bitsandbytes block sizes for absmax and double quantization
def nf4_bytes_per_param(double_quant: bool) -> float:
    """4-bit weights plus bitsandbytes' absmax per 64-weight block (8-bit + fp32 per 256 blocks if doubly quantized)."""
    if double_quant:
        return 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_DOUBLE_BLOCK)
    return 0.5 + 4 / NF4_BLOCK


# train.optim -> (states per parameter, bytes per state: None = the parameter's dtype, like torch's
# optimizers; a number = fixed, like bitsandbytes' 32-bit (fp32) and 8-bit (1 byte + blockwise absmax) states).
BNB_8BIT = 1 + 4 / 256  # bitsandbytes: 8-bit state plus an fp32 absmax per 256-value block
OPTIMIZERS: dict[str, tuple[float, float | None]] = {
    **dict.fromkeys(("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused",
                     "adamw_apex_fused", "stable_adamw", "schedule_free_adamw", "schedule_free_radam"), (2, None)),
    **dict.fromkeys(("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit"), (2, BNB_8BIT)),
    **dict.fromkeys(("paged_adamw_32bit", "paged_adamw"), (2, 4)),
    "adamw_torch_8bit": (2, 1 + 4 / 256), "adamw_torch_4bit": (2, 0.5 + 4 / 128),  # torchao block-wise states
    **dict.fromkeys(("ademamix", "paged_ademamix_32bit"), (3, 4)),
    **dict.fromkeys(("ademamix_8bit", "paged_ademamix_8bit"), (3, BNB_8BIT)),
    **dict.fromkeys(("lion_32bit", "paged_lion_32bit", "rmsprop_bnb", "rmsprop_bnb_32bit"), (1, 4)),
    **dict.fromkeys(("lion_8bit", "paged_lion_8bit", "rmsprop_bnb_8bit"), (1, BNB_8BIT)),
    **dict.fromkeys(("rmsprop", "adagrad"), (1, None)),
    "sgd": (0, None),  # TrainingArguments builds torch SGD without momentum unless optim_args set it
    "schedule_free_sgd": (1, None),
}  # fmt: skip
DEFAULT_OPTIM = "adamw_torch_fused"  # TrainingArguments' default


def optimizer_state(optim: str, param_bytes: float, hidden: int) -> tuple[float, str | None]:
    """(bytes of optimizer state per trainable parameter, the assumption made when `optim` is not modelled).

    `param_bytes` is the dtype of the parameters the optimizer steps (DeepSpeed: its fp32 partition).
    """
    if optim == "adafactor":
        # Factored second moment (one fp32 value per row and per column of each matrix), no first moment
        # (transformers' default beta1=None): about 2 x 4 bytes per `hidden` parameters.
        return 8 / hidden, None
    if optim in OPTIMIZERS:
        states, size = OPTIMIZERS[optim]
        return states * (param_bytes if size is None else size), None
    return 2 * param_bytes, f"train.optim {optim} is not modelled: assumed AdamW's two states per parameter"


def optimizer_step_temporaries(optim: str, param_bytes: float) -> float:
    """Bytes per trainable parameter the step allocates on top of the states: torch's foreach AdamW
    keeps one intermediate per parameter (torch.optim.AdamW docs); the fused and 8-bit kernels do not."""
    return param_bytes if optim in ("adamw_torch", "adamw_torch_xla", "stable_adamw") else 0.0


def deepspeed_settings(strategy: str, hidden: int) -> dict:
    """The zero_optimization section (and whether it brings its own optimizer) of the DeepSpeed JSON that
    `sftdist launch --strategy` passes, with "auto" filled the way transformers fills it."""
    _, path = config_paths(strategy)
    raw = deepspeed_json(path)
    zero = dict(raw.get("zero_optimization", {}))
    auto = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": 0.9 * hidden * hidden,
            "stage3_param_persistence_threshold": 10 * hidden}  # fmt: skip
    for key, value in auto.items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    zero.setdefault("stage3_max_live_parameters", 1_000_000_000)  # DeepSpeed's default
    zero["own_optimizer"] = "optimizer" in raw
    zero["file"] = str(path)
    return zero


@dataclass(frozen=True)
class ModelCounts:
    """What the planner needs from the model, counted on the meta device after peft wrapping."""

    model_type: str
    config_source: str  # where config.json was read: the recipe's model, or the published copy sftdist ships
    total: int  # distinct parameters (tied embeddings once)
    trainable: int  # all of them for method full, the adapters for lora/qlora
    quantized: int  # frozen weights that bitsandbytes would store in 4 bits (qlora only)
    layer_total: int  # the largest decoder layer
    layer_trainable: int
    layer_quantized: int
    outside_layers: int  # embeddings, final norm, LM head
    largest_module: int  # ZeRO-3 gathers module by module (DeepSpeed's "largest layer")
    largest_quantized: int  # QLoRA dequantizes one weight at a time
    hidden: int
    layers: int
    heads: int
    q_width: int  # heads x head_dim
    kv_width: int  # kv_heads x head_dim
    intermediate: int
    gated_mlp: bool
    vocab: int
    lora_inputs: int  # in_features summed over the LoRA-wrapped linears of one layer
    lora_modules: int
    active: int = 0  # parameters one token goes through (MoE: top-k of the routed experts); = total when dense


@dataclass(frozen=True)
class Workload:
    """What the recipe asks of each GPU besides the weights: dtypes, micro-batch, checkpointing."""

    loaded_bytes: int  # bytes/param of the weights as loaded (qlora: of the non-quantized ones)
    autocast: bool  # train.bf16 / train.fp16
    act_bytes: int
    batch: int
    seq: int
    checkpointing: bool
    optim: str = DEFAULT_OPTIM
    sequence_parallel: int = 1


@dataclass(frozen=True)
class Estimate:
    """Peak bytes per GPU for one strategy; CPU bytes per node for offload."""

    strategy: str
    weights: float
    grads: float
    optimizer: float
    buffers: float  # gradient buckets, gathered layers/modules, dequantization buffer
    step_extra: float  # fp32 gradient partition DeepSpeed makes for the step (after activations are freed)
    act_ckpt: float
    act_full: float
    cpu: float
    checkpointing: bool
    notes: tuple[str, ...] = ()  # assumptions this estimate rests on (e.g. an optimizer it does not model)

    @property
    def model_state(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def activations(self) -> float:
        return self.act_ckpt if self.checkpointing else self.act_full

    @property
    def total(self) -> float:
        return self.model_state + self.buffers + max(self.activations, self.step_extra)


@dataclass
class Plan:
    """Every strategy's estimate for one recipe on one cluster shape, and the pick."""

    recipe: Recipe
    counts: ModelCounts
    work: Workload
    gpus: int
    nodes: int
    gpu_memory: int
    cpu_memory: int | None
    estimates: list[Estimate]

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    @staticmethod
    def reserve(e: Estimate) -> float:
        """Memory no tensor can use: the CUDA context plus fragmentation that grows with the job."""
        return CUDA_RESERVE + FRAGMENTATION.get(e.strategy, FRAGMENTATION_DEFAULT) * e.total

    def margin(self, e: Estimate) -> float:
        return self.gpu_memory - self.reserve(e) - e.total

    def cpu_ok(self, e: Estimate) -> bool:
        return e.cpu == 0 or (self.cpu_memory is not None and e.cpu <= self.cpu_memory)

    def status(self, e: Estimate) -> str:
        """"fits"; "tight" when the margin is inside the planner's uncertainty (UNCERTAINTY of the
        estimate, the calibration table's spread); "no" when it is short or its CPU RAM is not known to suffice."""
        if self.margin(e) < 0 or not self.cpu_ok(e):
            return "no"
        return "tight" if self.margin(e) < UNCERTAINTY * e.total else "fits"

    @property
    def recommended(self) -> Estimate | None:
        """The fastest strategy that fits with room to spare, else the fastest that fits tightly; never QLoRA under
        FSDP2, which is estimated but refused until a GPU run proves it (preflight.check_strategy)."""
        allowed = [e for e in self.estimates if not (e.strategy == "fsdp2" and self.recipe.method == "qlora")]
        for wanted in ("fits", "tight"):
            best = next((e for e in allowed if self.status(e) == wanted), None)
            if best is not None:
                return best
        return None


def _largest_layer_list(model: object) -> list:
    """The decoder layers: the ModuleList that holds the most parameters."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise UserError(f"{type(model).__name__}: found no list of decoder layers to plan with")
    return list(max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters())))


SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _check_size_fields(config: object) -> None:
    """Refuse a config.json that leaves a size field out: transformers would fill it with its class default
    (e.g. Llama's 4096 hidden units) and the plan would be for another model.

    A field counts when the architecture's config class takes it (under its own name: GPT-2's n_embd);
    a stored null is the architecture's own choice (GPT-2's n_inner: 4h) and is accepted.
    """
    import inspect
    import json

    from transformers.utils import cached_file

    path = cached_file(config.name_or_path, "config.json")  # the file read: local, the hub's cache, or shipped
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    text_config = config.get_text_config()
    if text_config is not config:
        raw = raw.get("text_config", raw)
    cls = type(text_config)
    accepted = inspect.signature(cls.__init__).parameters
    aliases = getattr(cls, "attribute_map", {})
    for field_name in SIZE_FIELDS:
        stored = aliases.get(field_name, field_name)
        if stored in accepted and stored not in raw:
            raise UserError(
                f"{path}: missing '{stored}', a size of the model; add it from the model's published "
                f"config.json (transformers would fill in {cls.__name__}'s default and the plan would be for "
                "another model)"
            )


def _bnb_4bit_weights(model: object) -> set[int]:
    """ids of the weights transformers' replace_with_bnb_linear would store in 4 bits (Linear/Conv1D but those
    QLoRA keeps in the compute dtype: the head, MoE routers, layers too small for 4-bit)."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    from sftdist.model import unquantized_modules

    skip = unquantized_modules(model)
    return {
        id(module.weight)
        for name, module in model.named_modules()
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip)
    }


def count_model(recipe: Recipe) -> ModelCounts:
    """Build the recipe's model on the meta device, mark its 4-bit weights, wrap it with LoRA, and count."""
    from sftdist.model import meta_model, with_lora
    from sftdist.moe import active_parameters

    config, model = meta_model(recipe)
    _check_size_fields(config)
    quantized = _bnb_4bit_weights(model) if recipe.method == "qlora" else set()
    if recipe.method != "full":
        model = with_lora(model, recipe)
    params = list(model.parameters())
    trainable = {id(p) for p in params if p.requires_grad}

    layers = _largest_layer_list(model)
    layer = max(layers, key=lambda lyr: sum(p.numel() for p in lyr.parameters()))
    layer_params = list(layer.parameters())
    in_layers = {id(p) for lyr in layers for p in lyr.parameters()}
    lora_in = [mod.in_features for mod in layer.modules() if hasattr(mod, "lora_A") and hasattr(mod, "in_features")]
    names = [n for n, _ in layer.named_modules()]

    tc = config.get_text_config()
    hidden = tc.hidden_size
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or hidden // heads
    return ModelCounts(
        model_type=tc.model_type,
        config_source=config.name_or_path,
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if id(p) in trainable),
        quantized=sum(p.numel() for p in params if id(p) in quantized),
        layer_total=sum(p.numel() for p in layer_params),
        layer_trainable=sum(p.numel() for p in layer_params if id(p) in trainable),
        layer_quantized=sum(p.numel() for p in layer_params if id(p) in quantized),
        outside_layers=sum(p.numel() for p in params if id(p) not in in_layers),
        largest_module=max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules()),
        largest_quantized=max((p.numel() for p in params if id(p) in quantized), default=0),
        hidden=hidden,
        layers=tc.num_hidden_layers,
        heads=heads,
        q_width=heads * head_dim,
        kv_width=(getattr(tc, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=getattr(tc, "intermediate_size", None) or getattr(tc, "n_inner", None) or 4 * hidden,
        gated_mlp=any(n.rsplit(".", 1)[-1] in ("gate_proj", "gate_up_proj", "w1", "w3") for n in names),
        vocab=tc.vocab_size,
        lora_inputs=sum(lora_in),
        lora_modules=len(lora_in),
        active=active_parameters(model),
    )


def workload(recipe: Recipe) -> Workload:
    """Dtypes and micro-batch as sftdist would train the recipe on a bf16-capable GPU."""
    fp16 = bool(recipe.train_setting("fp16"))
    bf16 = recipe.train_setting("bf16")
    autocast = fp16 or bf16 is None or bool(bf16)  # trl: bf16 defaults to True unless fp16 is set
    # model.resolve_dtype: "auto" is fp32 for full fine-tuning (fp32 masters, bf16 autocast) and bf16
    # for a frozen LoRA base on a GPU; qlora loads the rest in the compute dtype.
    dtype = recipe.quantization.compute_dtype if recipe.method == "qlora" else recipe.model.dtype
    full_fp32 = recipe.method == "full" and dtype == "auto"
    loaded = 4 if dtype == "float32" or full_fp32 else 2
    batch = recipe.per_device_batch
    if not isinstance(batch, int) or batch < 1:
        raise UserError(f"{recipe.source}: train.per_device_train_batch_size is {batch!r}; expected a positive integer")
    optim = recipe.train_setting("optim") or DEFAULT_OPTIM
    return Workload(
        loaded_bytes=loaded,
        autocast=autocast,
        act_bytes=2 if autocast or loaded == 2 else 4,
        batch=batch,
        seq=recipe.data.max_length,
        checkpointing=recipe.activation_checkpointing,
        optim=str(getattr(optim, "value", optim)),
        sequence_parallel=recipe.sequence_parallel,
    )


def decoder_activation_bytes(recipe: Recipe, counts: ModelCounts, work: Workload) -> tuple[float, float]:
    """(with, without) activation checkpointing: the decoder layers' peak live activations per GPU for one
    micro-batch of batch x max_length tokens (split over `sequence_parallel` ranks: with packing, one packed row of
    max_length tokens, seqpar.check_packed_micro_batch), LM head excluded.

    Korthikanti et al. 2022 (arXiv:2205.05198, sec. 4.1) count the tensors autograd saves per layer;
    the same count for transformers' decoder layer (GQA widths, gated or plain MLP, sdpa/flash attention
    that keeps no s x s scores) is, in activation-sized values per token:
      norms     2 x n: each saves its input (an fp32 copy, 2 values, under 16-bit activations), its
                output for the next linear, and with trained weights its normalised input: n = 2-5
      attention 3*q_width + 2*kv_width (q, k, v after RoPE, attention output, o_proj input)
      MLP       4i gated (gate, up, act(gate), product) or 2i plain (fc output, activation)
    and the backward holds the gradients of the layer it is processing on top of that: 2i (the MLP's
    intermediate gradients; measured 1.5-2.3i on the CPU). Checkpointing keeps each layer's
    input (h) and recomputes one layer at a time (their "full recomputation", 2sbhL). Measured on the CPU
    against real forward+backward peaks in tests/test_plan.py.
    """
    c, h = work.act_bytes, counts.hidden
    tokens = work.batch * work.seq / work.sequence_parallel
    # A norm saves its input upcast to fp32 (2 values under 16-bit activations), its output for the next
    # linear, and for a trained weight the normalised input in the weights' dtype (fp32 under autocast).
    norm = (2 if c == 2 else 1) + 1
    if recipe.method == "full":
        norm += 2 if c == 2 and work.loaded_bytes == 4 else 1
    mlp = (4 if counts.gated_mlp else 2) * counts.intermediate
    per_layer = c * (2 * norm * h + 3 * counts.q_width + 2 * counts.kv_width + mlp)
    if recipe.model.attn_implementation == "eager":
        # Scores and probabilities: each token attends within its sample (at most max_length tokens). Under
        # sequence parallelism a rank scores heads / N for N times its tokens (seqpar_attention): the same amount.
        per_layer += c * 2 * counts.heads * work.seq
    if recipe.method != "full":
        per_layer += c * recipe.lora.r * counts.lora_modules  # lora_A output, kept for lora_B
        if recipe.lora.dropout > 0:  # each adapter keeps its own dropped-out copy of its input and the mask
            per_layer += (c + 1) * counts.lora_inputs
    backward = c * 2 * counts.intermediate
    full = tokens * (counts.layers * per_layer + backward)
    ckpt = tokens * (counts.layers * c * h + per_layer + backward)
    return float(ckpt), float(full)


def activation_bytes(recipe: Recipe, counts: ModelCounts, work: Workload) -> tuple[float, float]:
    """(with, without) checkpointing: the decoder's activations plus trl's fused LM head, which never
    materialises the tokens x vocab logits: final hidden states, per-token outputs, one fp32 tile."""
    ckpt, full = decoder_activation_bytes(recipe, counts, work)
    tokens = work.batch * work.seq / work.sequence_parallel
    head = tokens * (work.act_bytes * 2 * counts.hidden + PER_TOKEN_OUTPUTS)
    head += 4 * LOGPROB_TILE_TOKENS * min(counts.vocab, LOGPROB_TILE_VOCAB)
    return ckpt + head, full + head


def fsdp2_reshards_after_forward() -> bool:
    """fsdp_reshard_after_forward of the shipped FSDP2 accelerate config (false keeps every gathered
    layer until the backward, like ZeRO-2)."""
    import yaml

    acc, _ = config_paths("fsdp2")
    cfg = yaml.safe_load(acc.read_text(encoding="utf-8")) or {}
    return bool((cfg.get("fsdp_config") or {}).get("fsdp_reshard_after_forward", True))


def estimate(recipe: Recipe, counts: ModelCounts, work: Workload, strategy: str, world: int, nodes: int) -> Estimate:
    """Peak memory per GPU (and CPU per node) for one strategy; the accounting is derived in docs/plan.md."""
    c, n = work.act_bytes, world
    ds = strategy in DEEPSPEED
    q_bytes = nf4_bytes_per_param(recipe.quantization.double_quant)
    # Bytes per trainable parameter (weights; gradients share the dtype). Before any wrapper, full keeps
    # the loaded dtype, peft keeps adapters in fp32 and trl casts QLoRA adapters to bf16. Under mixed
    # precision accelerate's FSDP2 upcasts them to fp32, and DeepSpeed casts the whole module to 16 bits
    # (its optimizer keeps the fp32 master copy).
    ds_cast = ds and work.autocast
    tw = {"full": work.loaded_bytes, "lora": 4, "qlora": 2}[recipe.method]
    if strategy == "fsdp2" and work.autocast:
        tw = 4
    if ds_cast:
        tw = 2
    fw = 0 if recipe.method == "full" else 2 if ds_cast else work.loaded_bytes  # frozen, not quantized

    def weight_bytes(total: float, trainable: float, quantized: float, trainable_bytes: float) -> float:
        return trainable * trainable_bytes + quantized * q_bytes + (total - trainable - quantized) * fw

    t = counts.trainable
    all_w = weight_bytes(counts.total, t, counts.quantized, tw)
    grads = t * tw
    notes: list[str] = []
    zero = deepspeed_settings(strategy, counts.hidden) if ds else {}
    if zero.get("own_optimizer"):
        # The DeepSpeed JSON names its optimizer (AdamW): the HF Trainer's train.optim is not used.
        state, note = optimizer_state("adamw_torch", 4, counts.hidden)
        if work.optim != DEFAULT_OPTIM:
            notes.append(f"train.optim {work.optim} is replaced by the AdamW of {zero['file']}")
    else:
        # DeepSpeed steps the client optimizer on its fp32 partition; torch/FSDP2 on the parameters' dtype.
        state, note = optimizer_state(work.optim, 4 if ds else tw, counts.hidden)
    if note:
        notes.append(note)
    opt = t * (4 + state if ds else state)  # DeepSpeed adds its fp32 master copy
    temporaries = t * optimizer_step_temporaries(work.optim, 4 if ds else tw)
    dequant = c * counts.largest_quantized
    bucket = c * zero.get("reduce_bucket_size", counts.hidden**2)
    # After the backward (activations freed): DeepSpeed's fp32 gradient partition, the optimizer's temporaries.
    step = (4 * t / n if ds and work.autocast else 0.0) + temporaries / (n if strategy in ("fsdp2", "zero3") else 1)
    cpu = 0.0
    if strategy in ("single", "ddp"):
        w, g, o = all_w, grads, opt
        buffers = dequant + (grads if strategy == "ddp" else 0)  # DDP's buckets mirror every gradient
    elif strategy == "zero1":
        w, g, o, buffers = all_w, grads, opt / n, dequant + bucket
    elif strategy == "zero2":
        w, g, o, buffers = all_w, grads / n, opt / n, dequant + bucket
    elif strategy == "fsdp2":
        # Gathered in the compute dtype: the root (never resharded between forward and backward), the current
        # and the prefetched layer, and one layer's unsharded gradients before the reduce-scatter. Without
        # resharding after forward, every layer stays gathered until its backward.
        gathered = weight_bytes(counts.layer_total, counts.layer_trainable, counts.layer_quantized, c)
        layers = 2 if fsdp2_reshards_after_forward() else counts.layers
        root = counts.outside_layers * (fw or c)
        w, g, o = all_w / n, grads / n, opt / n
        buffers = dequant + root + layers * gathered + c * counts.layer_trainable
    else:
        # ZeRO-3 keeps up to stage3_max_live_parameters elements gathered, elements of the stored 16-bit
        # tensors (QLoRA's packed 4-bit weights included: four per element), plus the prefetch bucket,
        # the largest module's gradients and the reduce bucket.
        stored = weight_bytes(counts.total, t, counts.quantized, c)
        gathered = min(c * float(zero["stage3_max_live_parameters"]), stored)
        buffers = dequant + gathered + c * zero["stage3_prefetch_bucket_size"] + c * counts.largest_module + bucket
        if strategy == "zero3":
            w, g, o = all_w / n, grads / n, opt / n
        else:
            w = g = o = step = 0.0
            cpu = (all_w + t * 4 + opt) / nodes  # every local rank's params, fp32 grads, master + states
    act_ckpt, act_full = activation_bytes(recipe, counts, work)
    return Estimate(strategy, w, g, o, buffers, step, act_ckpt, act_full, cpu, work.checkpointing, tuple(notes))


def make_plan(
    recipe: Recipe,
    gpus: int,
    gpu_memory_bytes: int,
    nodes: int = 1,
    cpu_memory_bytes: int | None = None,
    counts: ModelCounts | None = None,
) -> Plan:
    """Estimate every strategy that makes sense for gpus x nodes (one GPU: single or zero3-offload).

    `counts` skips rebuilding the meta model when only the workload changed.
    """
    if gpus < 1 or nodes < 1:
        raise UserError(f"--num-processes {gpus} --num-machines {nodes}: expected at least one GPU on at least one machine")
    counts = counts or count_model(recipe)
    work = workload(recipe)
    world = gpus * nodes
    if world % work.sequence_parallel:
        raise UserError(
            f"{recipe.source}: sequence_parallel {work.sequence_parallel} does not divide the {world} GPU(s) in all; "
            f"expected one of {', '.join(map(str, sp_options(counts, world)))}"
        )
    names = ("single", "zero3-offload") if world == 1 else tuple(STRATEGIES)[1:]
    if work.sequence_parallel > 1:  # Ulysses runs under DeepSpeed only (seqpar.check refuses the others)
        from sftdist.seqpar import check_packed_micro_batch

        check_packed_micro_batch(recipe)
        names = tuple(n for n in names if n.startswith("zero"))
    estimates = [estimate(recipe, counts, work, s, world, nodes) for s in names]
    return Plan(recipe, counts, work, gpus, nodes, gpu_memory_bytes, cpu_memory_bytes, estimates)


def sp_options(counts: ModelCounts, world: int) -> list[int]:
    """Sequence-parallel sizes for `world` GPUs: divisors of the world that also divide the attention heads
    (Ulysses gives each rank whole heads)."""
    return [n for n in range(1, world + 1) if world % n == 0 and counts.heads % n == 0]


def with_sequence_parallel(plan: Plan, n: int) -> Plan:
    """The same plan with each sample split over n ranks: activations / n, model state unchanged. With packing,
    a micro-batch under sequence parallelism is one packed row (seqpar.check_packed_micro_batch)."""
    recipe = dataclasses.replace(plan.recipe, sequence_parallel=n)
    if n > 1 and recipe.data.packing:
        recipe = with_train(recipe, per_device_train_batch_size=1)
    return make_plan(recipe, plan.gpus, plan.gpu_memory, plan.nodes, plan.cpu_memory, plan.counts)


def one_sample(plan: Plan) -> Plan:
    """The plan for one sample at max_length per micro-batch, with checkpointing: the least a rank can hold."""
    recipe = with_train(plan.recipe, activation_checkpointing=True, per_device_train_batch_size=1)
    return make_plan(recipe, plan.gpus, plan.gpu_memory, plan.nodes, plan.cpu_memory, plan.counts)


def smallest_sp(plan: Plan) -> tuple[int, Plan] | None:
    """When one sample at max_length does not fit on one rank, the smallest sequence_parallel that fits."""
    if one_sample(plan).recommended is not None:
        return None
    for n in sp_options(plan.counts, plan.world)[1:]:
        alt = one_sample(with_sequence_parallel(plan, n))
        if alt.recommended is not None:
            return n, alt
    return None


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


# The largest safetensors file a published checkpoint holds (transformers' default max_shard_size): what a ZeRO-3
# process holds while transformers' zero.Init loading partitions the weights, one file at a time.
PUBLISHED_SHARD = 5 * 10**9


def host_ram_at_load(plan: Plan) -> str:
    """Host RAM per node that loading the weights takes, per strategy: FSDP2 reads them on rank 0 only
    (fsdp_cpu_ram_efficient_loading; the other ranks receive theirs by broadcast), ZeRO-3 about one checkpoint
    file per process, and every other strategy the whole model per process."""
    loaded = plan.counts.total * plan.work.loaded_bytes
    n = plan.gpus
    return (f"host RAM at load per node: fsdp2 {gib(loaded)} GiB (rank 0 reads the weights), zero3 about "
            f"{gib(n * min(loaded, PUBLISHED_SHARD))} GiB ({n} x one checkpoint file), single/ddp/zero1/zero2 "
            f"{gib(n * loaded)} GiB ({n} x the whole model)")


def format_plan(plan: Plan) -> str:
    """The table and the recommendation, as `sftdist plan` prints them."""
    r, k, w = plan.recipe, plan.counts, plan.work
    unit, scale = ("MiB", 1 << 20) if max(e.total for e in plan.estimates) < GiB else ("GiB", GiB)

    def cell(x: float, width: int) -> str:
        return f"{x / scale:>{width}.1f}"

    prec = ("bf16/fp16 autocast" if w.autocast else "no autocast") + f", weights loaded in {w.loaded_bytes} bytes"
    if r.method == "full":
        trained = f"{_count(k.total)} parameters, all trained"
    else:
        trained = f"{_count(k.total - k.trainable)} parameters + {_count(k.trainable)} trained LoRA parameters"
    if k.active and k.active != k.total:  # MoE: compute follows the active parameters, memory the total
        trained += f"; {_count(k.active)} active per token"
    sp = f", each split over {w.sequence_parallel} GPUs (sequence_parallel)" if w.sequence_parallel > 1 else ""
    shipped = k.config_source != r.model.name_or_path
    lines = [
        f"model: {r.model.name_or_path} ({k.model_type}, {trained}; method {r.method}; optimizer {w.optim})",
        *([f"config.json: the published copy shipped with sftdist ({k.config_source}); neither the hub nor its "
           "cache gave one here"] if shipped else []),
        f"micro-batch: {w.batch} x {w.seq} tokens per GPU{sp}; {prec}; activations {w.act_bytes} bytes/value; "
        f"gradient checkpointing {'on' if w.checkpointing else 'off'} (train.activation_checkpointing)",
        f"cluster: {plan.nodes} node(s) x {plan.gpus} GPU(s) x {gib(plan.gpu_memory)} GiB; reserve per GPU: "
        f"{gib(CUDA_RESERVE)} GiB for the CUDA context + {FRAGMENTATION_DEFAULT:.0%} of the total "
        f"({FRAGMENTATION['zero3']:.0%} for fsdp2/zero3) for fragmentation; figures in {unit} per GPU",
        host_ram_at_load(plan),
        "",
        f"{'strategy':<14}{'weights':>9}{'grads':>8}{'optim':>8}{'buffers':>9}{'act ckpt':>10}{'act full':>10}"
        f"{'total':>8}{'margin':>8}  {'CPU/node':>8}  fits",
    ]
    for e in plan.estimates:
        cpu = cell(e.cpu, 8) if e.cpu else f"{'-':>8}"
        status = plan.status(e)
        fits = {"fits": "yes", "tight": "tight"}.get(status, "no")
        if status == "no" and plan.margin(e) >= 0:
            fits = "no: CPU RAM unknown (--cpu-memory)" if plan.cpu_memory is None else "no: CPU RAM too small"
        lines.append(
            f"{e.strategy:<14}{cell(e.weights, 9)}{cell(e.grads, 8)}{cell(e.optimizer, 8)}{cell(e.buffers, 9)}"
            f"{cell(e.act_ckpt, 10)}{cell(e.act_full, 10)}{cell(e.total, 8)}{cell(plan.margin(e), 8)}  {cpu}  {fits}"
        )
    notes = dict.fromkeys(note for e in plan.estimates for note in e.notes)
    lines.extend(f"assumption: {note}" for note in notes)
    best = plan.recommended
    lines.append("")
    if best is not None:
        if plan.status(best) == "tight":
            lines.append(
                f"recommended: {best.strategy}, but tight: margin {gib(plan.margin(best))} GiB per GPU is within "
                f"the planner's {UNCERTAINTY:.0%} uncertainty; nothing fits with room to spare "
                f"(order: {', '.join(e.strategy for e in plan.estimates)})"
            )
        else:
            lines.append(
                f"recommended: {best.strategy} (margin {gib(plan.margin(best))} GiB per GPU): the fastest that fits "
                f"(order: {', '.join(e.strategy for e in plan.estimates)})"
            )
            faster = [e for e in plan.estimates[: plan.estimates.index(best)] if plan.status(e) == "tight"]
            if faster:
                lines.append(
                    f"note: {faster[0].strategy} is faster but tight (margin {gib(plan.margin(faster[0]))} GiB, "
                    f"within the planner's {UNCERTAINTY:.0%} uncertainty)"
                )
        lines.extend(_checkpointing_hints(plan, best))
    lines.extend(_sequence_parallel_lines(plan))
    return "\n".join(lines)


def _sequence_parallel_lines(plan: Plan) -> list[str]:
    """On several GPUs: what each sequence_parallel size gives for one sample (or packed row) at max_length per rank."""
    options = sp_options(plan.counts, plan.world)
    if len(options) < 2:
        return []
    unit = f"{plan.work.seq}-token {'packed row' if plan.recipe.data.packing else 'sample'}"
    parts = []
    for n in options:
        alt = one_sample(with_sequence_parallel(plan, n))
        best = alt.recommended
        act = gib(best.act_ckpt if best else min(e.act_ckpt for e in alt.estimates))
        outcome = "nothing fits"
        if best is not None:
            outcome = f"{best.strategy} {_fit_word(alt, best)}, margin {gib(alt.margin(best))}"
        parts.append(f"{n}: activations {act} GiB ({outcome})")
    lines = [
        f"sequence_parallel options (one {unit} per micro-batch, checkpointing on, per GPU): " + "; ".join(parts)
    ]
    found = smallest_sp(plan)
    if found is not None:
        lines.append(f"hint: one {unit} does not fit on one GPU; sequence_parallel: {found[0]} is the smallest that "
                     "fits")  # fmt: skip
    return lines


def _fit_word(plan: Plan, e: Estimate) -> str:
    return "fits" if plan.status(e) == "fits" else "tight"


def _with_checkpointing(plan: Plan, on: bool) -> Plan:
    flipped = [dataclasses.replace(e, checkpointing=on) for e in plan.estimates]
    return dataclasses.replace(plan, estimates=flipped, work=dataclasses.replace(plan.work, checkpointing=on))


def _checkpointing_hints(plan: Plan, best: Estimate) -> list[str]:
    """Say when flipping train.activation_checkpointing buys speed (off) or a faster strategy (on)."""
    other = _with_checkpointing(plan, not plan.work.checkpointing).recommended
    if other is None:
        return []
    if plan.work.checkpointing and other.strategy == best.strategy:
        return [
            f"hint: {best.strategy} also fits without gradient checkpointing (margin "
            f"{gib(plan.margin(other))} GiB): set train.activation_checkpointing=false for ~25% more speed"
        ]
    # Recomputation costs ~25%; only worth it to avoid gathering parameters in every pass (fsdp2/zero3/offload).
    order = list(STRATEGIES)
    if not plan.work.checkpointing and order.index(other.strategy) <= order.index("zero2") < order.index(best.strategy):
        return [
            f"hint: with train.activation_checkpointing=true, {other.strategy} fits (margin "
            f"{gib(plan.margin(other))} GiB) and no longer gathers parameters in every pass"
        ]
    return []


def _min_world(plan: Plan, strategy: str) -> int | None:
    """Fewest GPUs in all at which `strategy` fits, or None if its unsharded part alone is too big."""
    for world in range(2, 4097):
        e = estimate(plan.recipe, plan.counts, plan.work, strategy, world, 1)
        if plan.gpu_memory - plan.reserve(e) - e.total >= 0:
            return world
    return None


def _closest(plan: Plan) -> Estimate:
    """The estimate nearest to fitting among those whose CPU RAM need is known to be met."""
    met = [e for e in plan.estimates if plan.cpu_ok(e)]
    return min(met or plan.estimates, key=lambda e: e.total)


def _outcome(plan: Plan) -> str:
    best = plan.recommended
    if best is not None:
        return f"{best.strategy} {_fit_word(plan, best)}, margin {gib(plan.margin(best))} GiB"
    e = _closest(plan)
    return f"still {gib(-plan.margin(e))} GiB short with {e.strategy}"


def no_fit_error(plan: Plan) -> UserError:
    """Nothing fits: by how much, and what each change (checkpointing, batch 1, qlora, more GPUs) would give."""
    r = plan.recipe
    closest = _closest(plan)
    ckpt = with_train(r, activation_checkpointing=True)
    changes = []
    if not plan.work.checkpointing:
        changes.append(("train.activation_checkpointing=true", ckpt))
    if plan.work.batch > 1:
        changes.append(("train.per_device_train_batch_size=1 with checkpointing",
                        with_train(ckpt, per_device_train_batch_size=1)))
    if r.method != "qlora":
        changes.append(("method: qlora with checkpointing", dataclasses.replace(ckpt, method="qlora")))
    tries = []
    for label, alt in changes:
        counts = plan.counts if alt.method == r.method else None
        alt_plan = make_plan(alt, plan.gpus, plan.gpu_memory, plan.nodes, plan.cpu_memory, counts)
        tries.append(f"{label}: {_outcome(alt_plan)}")
    world = _min_world(_with_checkpointing(plan, True), "zero3")
    if world is not None and world > plan.world:
        tries.append(f"{world} GPUs in all with zero3 and checkpointing")
    found = smallest_sp(plan)
    if found is not None:
        n, alt = found
        tries.append(f"sequence_parallel: {n} with micro-batch 1 and checkpointing: {_outcome(alt)}")
    tries.append("a smaller data.max_length")
    offload = next((e for e in plan.estimates if e.strategy == "zero3-offload"), None)
    if offload is not None and plan.margin(offload) >= 0 and not plan.cpu_ok(offload):
        tries.append(f"zero3-offload, if each node has {gib(offload.cpu)} GiB of CPU RAM (--cpu-memory)")
    return UserError(
        f"{r.source}: no strategy fits method {r.method} of {r.model.name_or_path} ({_count(plan.counts.total)} "
        f"parameters) on {plan.world} GPU(s) of {gib(plan.gpu_memory)} GiB; the closest, {closest.strategy}, is "
        f"{gib(-plan.margin(closest))} GiB short per GPU. Try: {'; '.join(tries)}"
    )


def choose_strategy(
    recipe: Recipe, gpus: int, gpu_memory_bytes: int, nodes: int = 1, cpu_memory_bytes: int | None = None
) -> tuple[str, str]:
    """(strategy, why) for `sftdist launch --strategy auto`: the fastest that fits; UserError when none does."""
    plan = make_plan(recipe, gpus, gpu_memory_bytes, nodes, cpu_memory_bytes)
    best = plan.recommended
    if best is None:
        raise no_fit_error(plan)
    order = [e.strategy for e in plan.estimates]
    skipped = [e for e in plan.estimates[: order.index(best.strategy)]]
    why = (
        f"planned {gib(best.total)} GiB + {gib(plan.reserve(best))} GiB reserve per GPU of "
        f"{gib(plan.gpu_memory)} GiB on {plan.world} GPU(s), margin {gib(plan.margin(best))} GiB"
    )
    if plan.status(best) == "tight":
        why += f" (tight: within the planner's {UNCERTAINTY:.0%} uncertainty)"
    if skipped:
        why += "; faster but " + ", ".join(
            f"{e.strategy} {'tight' if plan.status(e) == 'tight' else f'short by {gib(-plan.margin(e))} GiB'}"
            if plan.margin(e) < 0 or plan.status(e) == "tight" else f"{e.strategy} needs CPU RAM"
            for e in skipped
        )
    return best.strategy, why
