"""Tokens per second per device and model-FLOPs utilisation (MFU), in the training logs and the selftest.

Gap filled: the Trainer logs `train_tokens_per_second` for all processes together, averaged from the
start of the run (the first step's warm-up included), and nothing relates it to the hardware. Here a
callback adds, to every training log, the tokens per second per device over the interval since the
previous log, and the MFU when the device's dense bf16 peak is known (`PEAK_TFLOPS_ENV`, else the table
below); to the Trainer's final log, which is also the `metrics` that `sftdist train` writes into
`sftdist_run.json`, it adds the same figures from the first logged step to the last.

Model FLOPs per token (the MFU convention of PaLM, Chowdhery et al. 2022, appendix B, as torchtitan
counts it), from the model's own layer shapes, i.e. its config.json:
  - 2 FLOPs per weight of every linear layer in the forward, 2 more for the input gradient and, for
    weights that train, 2 more for the weight gradient: 6 x trained + 4 x frozen weights (LoRA);
  - the output layer counts at loss positions only, because that is where trl's fused head on GPUs and
    sftdist's CPU head compute it (a share of the tokens: the data's loss tokens / tokens);
  - attention: 12 x layers x (heads x head_dim) x the keys each token attends to; packed samples attend
    only within themselves, causally, so that is (l + 1) / 2 for a token of an l-token sample, averaged
    over the data's tokens (PaLM's formula counts the whole row, which overstates packed rows).
Activation recomputation is not counted (that would be hardware FLOPs, not model FLOPs).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sftdist.errors import UserError

if TYPE_CHECKING:
    from sftdist.data.pipeline import Prepared

PEAK_TFLOPS_ENV = "SFTDIST_PEAK_TFLOPS"
# Dense (not 2:4 sparse) bf16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's datasheets; matched against
# torch.cuda.get_device_name() in this order (an H100 PCIe is not an H100 SXM; an A10G is not an A10).
DENSE_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100 NVL", 835.0),
    (r"H100 PCIe", 756.0),
    (r"H200 NVL", 835.0),
    (r"GH200", 989.0),
    (r"H200", 989.0),
    (r"H100", 989.0),  # SXM
    (r"B200", 2250.0),
    (r"A100", 312.0),
    (r"A800", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)
METRIC_TOKENS = "train_tokens_per_second_per_device"
METRIC_MFU = "mfu"


def peak_tflops(device: Any) -> tuple[float | None, str]:
    """(dense bf16 peak of one device in TFLOP/s, where the figure comes from); (None, why) when unknown."""
    raw = os.environ.get(PEAK_TFLOPS_ENV)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = 0.0
        if value <= 0:
            raise UserError(f"{PEAK_TFLOPS_ENV}={raw!r}: expected a positive number of TFLOP/s, e.g. 989")
        return value, PEAK_TFLOPS_ENV
    if getattr(device, "type", str(device)) != "cuda":
        return None, f"no bf16 peak is known for a CPU; set {PEAK_TFLOPS_ENV} (or --peak-tflops) for an MFU"
    import torch

    name = torch.cuda.get_device_name(device)
    tflops = gpu_peak_tflops(name)
    if tflops is None:
        return None, f"{name} is not in sftdist's table of GPUs; set {PEAK_TFLOPS_ENV} (or --peak-tflops) for an MFU"
    return tflops, f"{name}: dense bf16 datasheet figure"


def gpu_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a GPU named as torch.cuda.get_device_name names it, if the table knows it."""
    return next((tflops for pattern, tflops in DENSE_BF16_TFLOPS if re.search(pattern, name)), None)


@dataclass(frozen=True)
class FlopsPerToken:
    """Model FLOPs of one training token (forward + backward), by part."""

    linear: float  # every linear layer but the output layer
    head: float  # the output layer, times the share of tokens that carry loss
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.head + self.attention

    def to_dict(self) -> dict[str, float]:
        return {"linear": self.linear, "head": self.head, "attention": self.attention, "total": self.total}


def _linear_weights(module: Any) -> int | None:
    """Weights of a linear layer from its shape attributes (which survive 4-bit packing and ZeRO-3 sharding)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features * module.out_features
    if isinstance(module, Conv1D):  # GPT-2's transposed linear
        return module.nx * module.nf
    return None


def flops_per_token(model: Any, loss_share: float, mean_keys: float) -> FlopsPerToken:
    """Model FLOPs per token of `model` (after peft wrapping), see the module docstring.

    `loss_share`: tokens that carry loss / tokens; `mean_keys`: keys a token attends to, on average.
    """
    head = model.get_output_embeddings()
    linear = head_flops = 0.0
    for module in model.modules():
        weights = _linear_weights(module)
        if weights is None:
            continue
        flops = (6 if module.weight.requires_grad else 4) * weights
        if module is head:
            head_flops = flops * loss_share
        else:
            linear += flops
    from sftdist.moe import expert_parameters, numel

    for p, share in expert_parameters(model):  # MoE: only the top-k routed experts compute for a token
        linear += (6 if p.requires_grad else 4) * numel(p) * share
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * mean_keys
    return FlopsPerToken(linear, head_flops, attention)


def data_shape(data: Prepared) -> tuple[float, float]:
    """(share of training tokens that carry loss, mean keys a token attends to within its own sample)."""
    from sftdist.data.pipeline import sample_lengths

    lengths = sample_lengths(data.train_table()).astype("float64")
    report = data.report
    loss_share = report.train_loss_tokens / max(1, report.train_tokens)
    mean_keys = float((lengths * (lengths + 1) / 2).sum() / max(1.0, lengths.sum()))
    return loss_share, mean_keys


def _synchronize() -> None:
    """Wait for queued GPU work, so that a timestamp marks the end of the steps before it."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Throughput:
    """Trainer callback (made a subclass of TrainerCallback by `make_callback`): one (step, time, tokens)
    record per training log, and the rates between records.

    Timestamps are taken in `on_log`, after the Trainer has read the loss back from the device (a sync),
    and tokens are the Trainer's `num_input_tokens_seen` (non-padding tokens of all processes).
    """

    def __init__(self, flops: FlopsPerToken, peak: float | None, peak_source: str) -> None:
        self.flops = flops
        self.peak = peak
        self.peak_source = peak_source
        self.records: list[tuple[int, float, int]] = []
        self.world = 1

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.world = args.world_size
        self.records = [(state.global_step, time.perf_counter(), state.num_input_tokens_seen)]

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is None or args.include_num_input_tokens_seen == "no":
            return
        final = "train_runtime" in logs  # the Trainer's summary of the whole run
        if "loss" not in logs and not final:
            return  # an evaluation
        _synchronize()
        now = (state.global_step, time.perf_counter(), state.num_input_tokens_seen)
        if now[0] > self.records[-1][0]:
            previous = self.records[-1]
            self.records.append(now)
            logs.update(self.metrics(previous, now))
        if final:
            logs.update(self.metrics(self.records[min(1, len(self.records) - 1)], self.records[-1]))

    def metrics(self, start: tuple[int, float, int], end: tuple[int, float, int]) -> dict[str, float]:
        """Tokens/s per device (and MFU) between two records; nothing when they are the same step."""
        seconds, tokens = end[1] - start[1], end[2] - start[2]
        if end[0] <= start[0] or seconds <= 0:
            return {}
        per_device = tokens / seconds / self.world
        out = {METRIC_TOKENS: per_device}
        if self.peak:
            out[METRIC_MFU] = per_device * self.flops.total / (self.peak * 1e12)
        return out

    def since(self, step: int) -> dict[str, Any]:
        """The run's rates from the end of `step` (warm-up excluded) to the last record, with their basis."""
        start = next((r for r in self.records if r[0] >= step), self.records[0])
        end = self.records[-1]
        return {
            "from_step": start[0],
            "to_step": end[0],
            "seconds": end[1] - start[1],
            "tokens": end[2] - start[2],
            "tokens_per_second": (end[2] - start[2]) / max(end[1] - start[1], 1e-9),
            **self.metrics(start, end),
        }


def make_callback(trainer: Any, data: Prepared) -> Any:
    """A `Throughput` callback for `trainer`'s model (after peft wrapping) and data."""
    from transformers import TrainerCallback

    class ThroughputCallback(Throughput, TrainerCallback):
        pass

    loss_share, mean_keys = data_shape(data)
    peak, source = peak_tflops(trainer.args.device)
    return ThroughputCallback(flops_per_token(trainer.model, loss_share, mean_keys), peak, source)


def install(trainer: Any, data: Prepared) -> Any:
    """Add the callback first in line, so that the printed log and tensorboard, which are called after it on
    the same `logs`, show its metrics; return it."""
    callback = make_callback(trainer, data)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def installed(trainer: Any) -> Any:
    """The `Throughput` callback `install` gave `trainer`."""
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Throughput))
