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
import re
from dataclasses import dataclass

from sftdist.errors import UserError
from sftdist.recipe import Recipe

# Fastest first. ddp: one all-reduce of the gradients (2 x model bytes per step). zero1/zero2: the same
# volume split into reduce-scatter + all-gather, plus bucketing and a sharded optimizer step. fsdp2/zero3:
# parameters are all-gathered again in forward and backward (1.5x the volume, ZeRO paper sec. 7);
# FSDP2 ranks before ZeRO-3 for its per-parameter sharding without DeepSpeed's hooks. zero3-offload
# moves parameters over PCIe every step and runs Adam on the CPU: the slowest.
STRATEGIES = ("single", "ddp", "zero1", "zero2", "fsdp2", "zero3", "zero3-offload")
DEEPSPEED = ("zero1", "zero2", "zero3", "zero3-offload")
GiB = 1 << 30
CUDA_RESERVE = 1 * GiB  # CUDA context, cuBLAS/NCCL workspaces and allocator slack: never usable by tensors
TRL_BATCH_SIZE = 8  # per_device_train_batch_size when the recipe does not set it (TrainingArguments, kept by trl)
# trl's fused LM head (add_fused_lm_head) scores tiles of 1024 tokens x 32768 vocabulary entries in fp32.
LOGPROB_TILE_TOKENS, LOGPROB_TILE_VOCAB = 1024, 32768
PER_TOKEN_OUTPUTS = 16  # fp32 log-prob, entropy, top-1 and log-sum-exp per token from that head
NF4_BLOCK, NF4_DOUBLE_BLOCK = 64, 256  # bitsandbytes block sizes for absmax and double quantization
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}  # fmt: skip


def parse_size(text: str, what: str = "--gpu-memory") -> int:
    """'80GiB', '24GB', '81920MiB' -> bytes (GB is 10^9, GiB is 2^30; nvidia-smi's MiB are 2^20)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise UserError(f"{what} {text!r}: expected a size such as 500MB, 24GB or 80GiB")
    size = int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])
    if size <= 0:
        raise UserError(f"{what} {text!r}: expected a positive size")
    return size


def nf4_bytes_per_param(double_quant: bool) -> float:
    """4-bit weights plus bitsandbytes' absmax per 64-weight block (8-bit + fp32 per 256 blocks if doubly quantized)."""
    if double_quant:
        return 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_DOUBLE_BLOCK)
    return 0.5 + 4 / NF4_BLOCK


@dataclass(frozen=True)
class ModelCounts:
    """What the planner needs from the model, counted on the meta device after peft wrapping."""

    model_type: str
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


@dataclass(frozen=True)
class Workload:
    """What the recipe asks of each GPU besides the weights: dtypes, micro-batch, checkpointing."""

    loaded_bytes: int  # bytes/param of the weights as loaded (qlora: of the non-quantized ones)
    autocast: bool  # train.bf16 / train.fp16
    act_bytes: int
    batch: int
    seq: int
    checkpointing: bool


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

    def margin(self, e: Estimate) -> float:
        return self.gpu_memory - CUDA_RESERVE - e.total

    def fits(self, e: Estimate) -> bool:
        if self.margin(e) < 0:
            return False
        return e.cpu == 0 or (self.cpu_memory is not None and e.cpu <= self.cpu_memory)

    @property
    def recommended(self) -> Estimate | None:
        return next((e for e in self.estimates if self.fits(e)), None)


def _largest_layer_list(model: object) -> list:
    """The decoder layers: the ModuleList that holds the most parameters."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise UserError(f"{type(model).__name__}: found no list of decoder layers to plan with")
    return list(max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters())))


def _meta_model(recipe: Recipe) -> tuple[object, object]:
    """(config, model) with every tensor on the meta device: shapes only, no weights read or allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftdist.model import check_model_path

    m = recipe.model
    check_model_path(m.name_or_path)
    try:
        config = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
        with torch.device("meta"):
            return config, AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{m.name_or_path}: cannot build a causal LM from its config.json ({msg})") from None


def _bnb_4bit_weights(model: object) -> set[int]:
    """ids of the weights transformers' replace_with_bnb_linear would store in 4 bits (Linear/Conv1D but the head)."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model)
    return {
        id(module.weight)
        for name, module in model.named_modules()
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip)
    }


def _with_lora(model: object, recipe: Recipe) -> object:
    """The model wrapped by peft exactly as training wraps it (same LoraConfig), still on the meta device."""
    import warnings

    import torch
    from peft import get_peft_model

    from sftdist.model import lora_config

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. fan_in_fan_out notes for Conv1D: this is a count, not a run
        try:
            return get_peft_model(model, lora_config(recipe))
        except ValueError as e:
            raise UserError(f"{recipe.source}: lora: {str(e).splitlines()[0]}") from None


def count_model(recipe: Recipe) -> ModelCounts:
    """Build the recipe's model on the meta device, mark its 4-bit weights, wrap it with LoRA, and count."""
    config, model = _meta_model(recipe)
    quantized = _bnb_4bit_weights(model) if recipe.method == "qlora" else set()
    if recipe.method != "full":
        model = _with_lora(model, recipe)
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
    )


def workload(recipe: Recipe) -> Workload:
    """Dtypes and micro-batch as sftdist would train the recipe on a bf16-capable GPU."""
    from sftdist.train import train_kwargs

    t = train_kwargs(recipe)
    fp16 = bool(t.get("fp16"))
    autocast = fp16 or bool(t.get("bf16", True))  # trl: bf16 defaults to True unless fp16 is set
    # model.resolve_dtype: "auto" is fp32 for full fine-tuning (fp32 masters, bf16 autocast) and bf16
    # for a frozen LoRA base on a GPU; qlora loads the rest in the compute dtype.
    dtype = recipe.quantization.compute_dtype if recipe.method == "qlora" else recipe.model.dtype
    full_fp32 = recipe.method == "full" and dtype == "auto"
    loaded = 4 if dtype == "float32" or full_fp32 else 2
    batch = t.get("per_device_train_batch_size", TRL_BATCH_SIZE)
    if not isinstance(batch, int) or batch < 1:
        raise UserError(f"{recipe.source}: train.per_device_train_batch_size is {batch!r}; expected a positive integer")
    return Workload(
        loaded_bytes=loaded,
        autocast=autocast,
        act_bytes=2 if autocast or loaded == 2 else 4,
        batch=batch,
        seq=recipe.data.max_length,
        checkpointing=bool(t["activation_checkpointing"]),
    )


def activation_bytes(recipe: Recipe, counts: ModelCounts, work: Workload) -> tuple[float, float]:
    """(with, without) activation checkpointing, per GPU, for one micro-batch of batch x max_length tokens.

    Korthikanti et al. 2022 (arXiv:2205.05198, sec. 4.1) count the tensors autograd saves per layer;
    the same count for this layer shape (GQA widths, gated or plain MLP, sdpa/flash attention that
    keeps no s x s scores) is, in activation-sized values per token:
      attention 2h + 3*q_width + 2*kv_width (norm input, q/k/v input, q, k, v, attention output, o_proj input)
      MLP       2h + 4i gated (norm input, up/gate input, gate, up, act(gate), product) or 2h + 2i plain
    For GPT-2 (i = 4h, dropout aside) that is 34sbh bytes per layer in fp16, their equation (1) without
    the attention-score term, which is added back for eager attention. Checkpointing keeps each
    layer's input (h) and recomputes one layer at a time (their "full recomputation", 2sbhL).
    """
    c, h = work.act_bytes, counts.hidden
    tokens = work.batch * work.seq
    mlp = 2 * h + (4 if counts.gated_mlp else 2) * counts.intermediate
    per_layer = c * (2 * h + 3 * counts.q_width + 2 * counts.kv_width + mlp)
    if recipe.model.attn_implementation == "eager":
        per_layer += c * 2 * counts.heads * work.seq  # scores and probabilities
    if recipe.method != "full":
        per_layer += c * recipe.lora.r * counts.lora_modules  # lora_A output, kept for lora_B
        if recipe.lora.dropout > 0:  # each adapter keeps its own dropped-out copy of its input and the mask
            per_layer += (c + 1) * counts.lora_inputs
    head = tokens * (c * 2 * h + PER_TOKEN_OUTPUTS) + 4 * LOGPROB_TILE_TOKENS * min(counts.vocab, LOGPROB_TILE_VOCAB)
    full = tokens * counts.layers * per_layer + head
    ckpt = tokens * (counts.layers * c * h + per_layer) + head
    return float(ckpt), float(full)


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

    def weight_bytes(total: int, trainable: int, quantized: int, trainable_bytes: float) -> float:
        return trainable * trainable_bytes + quantized * q_bytes + (total - trainable - quantized) * fw

    t = counts.trainable
    all_w = weight_bytes(counts.total, t, counts.quantized, tw)
    grads = t * tw
    opt = t * 12 if ds else t * 2 * tw  # DeepSpeed: fp32 master + m + v; torch AdamW: m + v in the param dtype
    dequant = c * counts.largest_quantized
    bucket = c * counts.hidden**2  # reduce_bucket_size "auto" = hidden^2 elements
    step = 4 * t / n if ds and work.autocast else 0.0
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
        # and the prefetched layer, and one layer's unsharded gradients before the reduce-scatter.
        gathered = weight_bytes(counts.layer_total, counts.layer_trainable, counts.layer_quantized, c)
        root = counts.outside_layers * (fw or c)
        w, g, o = all_w / n, grads / n, opt / n
        buffers = dequant + root + 2 * gathered + c * counts.layer_trainable
    else:
        # DeepSpeed's estimate_zero3_model_states_mem_needs: the largest module's parameters and gradients
        # gathered, plus the prefetch (0.9 h^2) and reduce buckets.
        buffers = dequant + 2 * c * counts.largest_module + 0.9 * bucket + bucket
        if strategy == "zero3":
            w, g, o = all_w / n, grads / n, opt / n
        else:
            w = g = o = step = 0.0
            cpu = (all_w + t * 4 + opt) / nodes  # every local rank's params, fp32 grads, master + m + v
    act_ckpt, act_full = activation_bytes(recipe, counts, work)
    return Estimate(strategy, w, g, o, buffers, step, act_ckpt, act_full, cpu, work.checkpointing)


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
        raise UserError(f"--gpus {gpus} --nodes {nodes}: expected at least one GPU on at least one node")
    counts = counts or count_model(recipe)
    work = workload(recipe)
    world = gpus * nodes
    names = ("single", "zero3-offload") if world == 1 else STRATEGIES[1:]
    estimates = [estimate(recipe, counts, work, s, world, nodes) for s in names]
    return Plan(recipe, counts, work, gpus, nodes, gpu_memory_bytes, cpu_memory_bytes, estimates)


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


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
    lines = [
        f"model: {r.model.name_or_path} ({k.model_type}, {trained}; method {r.method})",
        f"micro-batch: {w.batch} x {w.seq} tokens per GPU; {prec}; activations {w.act_bytes} bytes/value; "
        f"gradient checkpointing {'on' if w.checkpointing else 'off'} (train.gradient_checkpointing)",
        f"cluster: {plan.nodes} node(s) x {plan.gpus} GPU(s) x {_gib(plan.gpu_memory)} GiB; "
        f"{_gib(CUDA_RESERVE)} GiB per GPU kept for the CUDA context; figures in {unit} per GPU",
        "",
        f"{'strategy':<14}{'weights':>9}{'grads':>8}{'optim':>8}{'buffers':>9}{'act ckpt':>10}{'act full':>10}"
        f"{'total':>8}{'margin':>8}  {'CPU/node':>8}  fits",
    ]
    for e in plan.estimates:
        cpu = cell(e.cpu, 8) if e.cpu else f"{'-':>8}"
        fits = "yes" if plan.fits(e) else ("no: CPU RAM unknown (--cpu-memory)" if plan.margin(e) >= 0 else "no")
        lines.append(
            f"{e.strategy:<14}{cell(e.weights, 9)}{cell(e.grads, 8)}{cell(e.optimizer, 8)}{cell(e.buffers, 9)}"
            f"{cell(e.act_ckpt, 10)}{cell(e.act_full, 10)}{cell(e.total, 8)}{cell(plan.margin(e), 8)}  {cpu}  {fits}"
        )
    best = plan.recommended
    lines.append("")
    if best is not None:
        lines.append(
            f"recommended: {best.strategy} (margin {_gib(plan.margin(best))} GiB per GPU): the fastest that fits "
            f"(order: {', '.join(e.strategy for e in plan.estimates)})"
        )
        lines.extend(_checkpointing_hints(plan, best))
    return "\n".join(lines)


def _with_checkpointing(plan: Plan, on: bool) -> Plan:
    flipped = [dataclasses.replace(e, checkpointing=on) for e in plan.estimates]
    return dataclasses.replace(plan, estimates=flipped, work=dataclasses.replace(plan.work, checkpointing=on))


def _checkpointing_hints(plan: Plan, best: Estimate) -> list[str]:
    """Say when flipping train.gradient_checkpointing buys speed (off) or a faster strategy (on)."""
    other = _with_checkpointing(plan, not plan.work.checkpointing).recommended
    if other is None:
        return []
    if plan.work.checkpointing and other.strategy == best.strategy:
        return [
            f"hint: {best.strategy} also fits without gradient checkpointing (margin "
            f"{_gib(plan.margin(other))} GiB): set train.gradient_checkpointing=false for ~25% more speed"
        ]
    # Recomputation costs ~25%; only worth it to avoid gathering parameters in every pass (fsdp2/zero3/offload).
    if not plan.work.checkpointing and STRATEGIES.index(other.strategy) <= STRATEGIES.index("zero2") < STRATEGIES.index(
        best.strategy
    ):
        return [
            f"hint: with train.gradient_checkpointing=true, {other.strategy} fits (margin "
            f"{_gib(plan.margin(other))} GiB) and no longer gathers parameters in every pass"
        ]
    return []


def _min_world(plan: Plan, strategy: str) -> int | None:
    """Fewest GPUs in all at which `strategy` fits, or None if its unsharded part alone is too big."""
    for world in range(2, 4097):
        e = estimate(plan.recipe, plan.counts, plan.work, strategy, world, 1)
        if plan.gpu_memory - CUDA_RESERVE - e.total >= 0:
            return world
    return None


def _closest(plan: Plan) -> Estimate:
    """The estimate nearest to fitting among those whose CPU RAM need is known to be met."""
    met = [e for e in plan.estimates if e.cpu == 0 or (plan.cpu_memory is not None and e.cpu <= plan.cpu_memory)]
    return min(met or plan.estimates, key=lambda e: e.total)


def _outcome(plan: Plan) -> str:
    best = plan.recommended
    if best is not None:
        return f"{best.strategy} fits, margin {_gib(plan.margin(best))} GiB"
    e = _closest(plan)
    return f"still {_gib(-plan.margin(e))} GiB short with {e.strategy}"


def no_fit_error(plan: Plan) -> UserError:
    """Nothing fits: by how much, and what each change (checkpointing, batch 1, qlora, more GPUs) would give."""
    r = plan.recipe
    closest = _closest(plan)
    ckpt = {**{k: v for k, v in r.train.items() if k != "gradient_checkpointing"}, "activation_checkpointing": True}
    changes = []
    if not plan.work.checkpointing:
        changes.append(("train.gradient_checkpointing=true", {"train": ckpt}))
    if plan.work.batch > 1:
        batch1 = {**ckpt, "per_device_train_batch_size": 1}
        changes.append(("train.per_device_train_batch_size=1 with checkpointing", {"train": batch1}))
    if r.method != "qlora":
        changes.append(("method: qlora with checkpointing", {"method": "qlora", "train": ckpt}))
    tries = []
    for label, change in changes:
        alt = dataclasses.replace(r, **change)
        counts = plan.counts if alt.method == r.method else None
        alt_plan = make_plan(alt, plan.gpus, plan.gpu_memory, plan.nodes, plan.cpu_memory, counts)
        tries.append(f"{label}: {_outcome(alt_plan)}")
    world = _min_world(_with_checkpointing(plan, True), "zero3")
    if world is not None and world > plan.world:
        tries.append(f"{world} GPUs in all with zero3 and checkpointing")
    tries.append("a smaller data.max_length")
    offload = next((e for e in plan.estimates if e.strategy == "zero3-offload"), None)
    if offload is not None and plan.margin(offload) >= 0 and not plan.fits(offload):
        tries.append(f"zero3-offload, if each node has {_gib(offload.cpu)} GiB of CPU RAM (--cpu-memory)")
    return UserError(
        f"{r.source}: no strategy fits method {r.method} of {r.model.name_or_path} ({_count(plan.counts.total)} "
        f"parameters) on {plan.world} GPU(s) of {_gib(plan.gpu_memory)} GiB; the closest, {closest.strategy}, is "
        f"{_gib(-plan.margin(closest))} GiB short per GPU. Try: {'; '.join(tries)}"
    )


def recommend_strategy(
    recipe: Recipe, gpus: int, gpu_memory_bytes: int, nodes: int = 1, cpu_memory_bytes: int | None = None
) -> str:
    """The fastest strategy that fits (for `sftdist launch --strategy auto`); UserError when none does.

    zero3-offload is only chosen when the CPU RAM per node is given and large enough.
    """
    plan = make_plan(recipe, gpus, gpu_memory_bytes, nodes, cpu_memory_bytes)
    best = plan.recommended
    if best is None:
        raise no_fit_error(plan)
    return best.strategy
