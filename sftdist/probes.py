"""What a live trainer really runs, measured where it runs: peak memory, the batch the model is given,
the weights' dtypes and 4-bit packing, the packing check and the all-reduce bandwidth.

`sftdist selftest` (selftest_rank.py) reads these off the trainer `sftdist train` builds, after it
trained; none of them changes what the trainer does.
"""

from __future__ import annotations

import threading
import time
from typing import Any

# torch.testing.assert_close's default (rtol, atol) per dtype: "the dtype's tolerance" for two losses
# computed by different kernels (one packed row, or its samples one by one).
TOLERANCE = {"float32": (1.3e-6, 1e-5), "bfloat16": (1.6e-2, 1e-5), "float16": (1e-3, 1e-5)}
PACKING_CHECK_SAMPLES = 8  # the first samples of the fullest packed row: a row of its own, and cheap


def heap_in_use() -> int | None:
    """Bytes glibc's malloc has handed out and not taken back (`mallinfo2`: arenas + mmapped chunks), or
    None without glibc >= 2.33. Gap: psutil reports the resident set only, which also counts code pages
    loaded on first use and freed memory the allocator keeps; this is the CPU's `memory_allocated`."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]  # fmt: skip

    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


class MemoryWatch:
    """Peak memory of this process on its device, from `start()` on.

    CUDA: the caching allocator's own peaks (`max_memory_allocated`: tensors; `max_memory_reserved`: what
    it holds, fragmentation included). CPU: the resident set and, with glibc, the heap in use
    (`heap_in_use`), sampled every 2 ms by a thread, each as its growth over its value at `start()`
    (libraries imported, tokenizer and data loaded, no model yet). `measured`, what the plan is compared
    with, is the allocated figure: CUDA's peak allocated, the heap's growth (else the resident set's).
    """

    def __init__(self, device: Any) -> None:
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.device = device
        self.baseline: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> dict[str, int]:
        import psutil

        now = {"rss": psutil.Process().memory_info().rss}
        heap = heap_in_use()
        if heap is not None:
            now["heap"] = heap
        return now

    def start(self) -> MemoryWatch:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = {"allocated": torch.cuda.memory_allocated(self.device)}
            return self
        self.baseline = self.peak = self._sample()

        def sample() -> None:
            while not self._stop.wait(0.002):
                self.peak = {k: max(v, self.peak[k]) for k, v in self._sample().items()}

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """The peaks, the baseline, and `measured` (see the class docstring)."""
        if self.cuda:
            import torch

            allocated = torch.cuda.max_memory_allocated(self.device)
            return {"kind": "cuda max_memory_allocated", "measured": allocated, "peak_allocated": allocated,
                    "peak_reserved": torch.cuda.max_memory_reserved(self.device), "baseline": self.baseline}  # fmt: skip
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        growth = {k: self.peak[k] - self.baseline[k] for k in self.peak}
        kind = "heap" if "heap" in growth else "rss"
        return {"kind": f"cpu {kind} growth", "measured": growth[kind], "peak_rss": self.peak["rss"],
                "rss_growth": growth["rss"], "heap_growth": growth.get("heap"), "baseline": self.baseline}  # fmt: skip


class BatchProbe:
    """What the model is given in its first training forward: the keys, the shape, the pad tokens and how
    many samples share the rows (a forward pre-hook, removed after that call)."""

    def __init__(self, model: Any, pad_token_id: int) -> None:
        self.pad = pad_token_id
        self.seen: dict[str, Any] | None = None
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.seen is not None or not module.training:
            return
        ids, pos = kwargs.get("input_ids"), kwargs.get("position_ids")
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        self.seen = {
            "inputs": sorted(k for k, v in kwargs.items() if v is not None),
            "shape": list(ids.shape),
            "pad_tokens": int((ids == self.pad).sum()),
            "samples": int((pos == 0).sum()) if pos is not None else int(ids.shape[0]),
            "attention_mask": mask is not None,
        }
        self.seen["padding_free"] = bool(not self.seen["attention_mask"] and pos is not None
                                         and self.seen["pad_tokens"] == 0)  # fmt: skip
        self._handle.remove()


def compute_dtype(trainer: Any) -> str:
    """The dtype the matmuls ran in: the autocast dtype, else the trained weights'."""
    if trainer.args.bf16:
        return "bfloat16"
    if trainer.args.fp16:
        return "float16"
    trained = next(p for p in trainer.model.parameters() if p.requires_grad)
    return str(trained.dtype).removeprefix("torch.")


def weights(trainer: Any) -> dict[str, Any]:
    """dtypes of the trained and the frozen weights, and the bitsandbytes 4-bit layers with their device."""
    model = trainer.model
    trained = next((p for p in model.parameters() if p.requires_grad), None)
    frozen = next((p for p in model.parameters() if not p.requires_grad), None)
    out: dict[str, Any] = {
        "trained_dtype": str(trained.dtype).removeprefix("torch.") if trained is not None else None,
        "frozen_dtype": str(frozen.dtype).removeprefix("torch.") if frozen is not None else None,
        "linear4bit_layers": 0,
    }
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001 (bitsandbytes raises assorted errors without a backend): then nothing is 4-bit
        return out
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    packed = [m for m in layers if isinstance(m.weight, bnb.nn.Params4bit) and m.weight.quant_state is not None]
    out["linear4bit_layers"] = len(layers)
    if layers:
        out["linear4bit_packed"] = len(packed)
        out["linear4bit_devices"] = sorted({str(m.weight.device) for m in packed})
        out["linear4bit_quant_type"] = sorted({m.weight.quant_type for m in packed})
        out["linear4bit_storage"] = sorted({str(m.weight.dtype).removeprefix("torch.") for m in packed})
    return out


def packing_check(trainer: Any) -> dict[str, Any] | None:
    """The loss of one packed row (the trainer's collator and model, on its device, in its precision) against
    the token-weighted losses of the same samples run one by one; None when the rows are not packed."""
    import torch
    from accelerate.utils import send_to_device

    dataset = trainer.train_dataset
    if "seq_lengths" not in dataset.column_names:
        return None
    head = dataset.select(range(min(64, len(dataset))))
    index = max(range(len(head)), key=lambda i: len(head[i]["seq_lengths"]))
    row = head[index]
    lengths = row["seq_lengths"][:PACKING_CHECK_SAMPLES]
    n = sum(lengths)
    ids, labels = row["input_ids"][:n], row["labels"][:n]
    batch = trainer.data_collator([{"input_ids": ids, "labels": labels, "seq_lengths": lengths}])
    device, model = trainer.args.device, trainer.model
    was_training = model.training
    model.eval()
    total = count = 0.0
    try:
        with torch.no_grad(), trainer.accelerator.autocast():
            packed = model(**send_to_device(batch, device), use_cache=False).loss.float().item()
            start = 0
            for length in lengths:
                sample_ids = torch.tensor([ids[start:start + length]], device=device)
                sample_labels = torch.tensor([[-100, *labels[start + 1:start + length]]], device=device)
                start += length
                predicted = int((sample_labels[0, 1:] != -100).sum())  # the model shifts labels by one
                if predicted:
                    loss = model(input_ids=sample_ids, labels=sample_labels, use_cache=False).loss.float().item()
                    total += loss * predicted
                    count += predicted
    finally:
        model.train(was_training)
    single = total / count
    dtype = compute_dtype(trainer)
    rtol, atol = TOLERANCE.get(dtype, TOLERANCE["float32"])
    tolerance = atol + rtol * abs(single)
    return {
        "samples": len(lengths),
        "tokens": n,
        "loss_tokens": int(count),
        "packed_loss": packed,
        "per_sample_loss": single,
        "abs_diff": abs(packed - single),
        "dtype": dtype,
        "tolerance": tolerance,
        "passed": abs(packed - single) <= tolerance,
    }


def allreduce_bandwidth(device: Any, world: int, iterations: int = 10) -> dict[str, Any]:
    """All-reduce bus bandwidth of the process group, as nccl-tests counts it: bytes / time x 2(n-1)/n
    (what each link carries in a ring all-reduce). 256 MiB of bf16 on GPUs, 16 MiB of fp32 on CPU."""
    import torch
    import torch.distributed as dist

    cuda = getattr(device, "type", str(device)) == "cuda"
    dtype, nbytes = (torch.bfloat16, 256 << 20) if cuda else (torch.float32, 16 << 20)
    x = torch.zeros(nbytes // torch.tensor([], dtype=dtype).element_size(), dtype=dtype, device=device)

    def wait() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(3):
        dist.all_reduce(x)
    wait()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(x)
    wait()
    seconds = (time.perf_counter() - start) / iterations
    algorithm = nbytes / seconds
    return {
        "bytes": nbytes,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": seconds,
        "algorithm_gb_per_s": algorithm / 1e9,
        "bus_gb_per_s": algorithm * 2 * (world - 1) / world / 1e9,
    }
