"""Sum the tensor bytes one rank really holds for model state, after a real optimizer step.

Run under `torchrun --standalone --nproc_per_node 2 tests/workers/count_state.py ddp,zero2,zero3 MODEL_DIR OUT_DIR`.
MODEL_DIR holds only a config.json; the model is built from it in fp32 (CPU has no bf16 mixed
precision). The strategies run one after the other in the same gloo group, each on a fresh model;
each rank writes OUT_DIR/rank{N}.json: [{"rank", "world", "strategy", "bytes"}, ...], where bytes is
the size of every distinct tensor storage reachable from the wrapped model and the optimizer
(parameters, gradients, optimizer states, ZeRO's flat and partitioned groups and buckets), taken
after a second backward pass so that gradients and Adam states are both alive. DDP's C++ gradient
buckets are not reachable from Python and are not counted (the planner lists them as buffers).
"""

from __future__ import annotations

import json
import os
import sys

import torch

# Objects whose attributes are walked: containers, modules, and DeepSpeed/torch optimizer state.
WALK_MODULES = ("deepspeed", "torch.optim", "torch.nn")


def held_bytes(*roots: object) -> int:
    """Bytes of distinct storages reachable from roots (views into a flat buffer count once)."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta":
                st = obj.untyped_storage()
                if st.nbytes():
                    storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
            if obj.grad is not None:
                stack.append(obj.grad)
            stack.extend(getattr(obj, "__dict__", {}).values())  # ZeRO-3 keeps partitions in param.ds_tensor
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, torch.nn.Module) or type(obj).__module__.startswith(WALK_MODULES):
            stack.extend(getattr(obj, "__dict__", {}).values())
    return sum(storages.values())


def zero_config(stage: int, hidden: int, world: int) -> dict:
    """The ZeRO settings of sftdist/configs/deepspeed/zero{2,3}.json (inlined: the test must not depend on where
    they live), with "auto" filled the way transformers fills it, and fp32 (CPU)."""
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    zero["reduce_bucket_size"] = hidden * hidden
    if stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=200_000_000, reduce_scatter=True)
    else:
        zero.update(
            sub_group_size=1_000_000_000,
            stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
            stage3_param_persistence_threshold=10 * hidden,
            stage3_max_live_parameters=1_000_000_000,
            stage3_max_reuse_distance=1_000_000_000,
        )
    return {
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "train_micro_batch_size_per_gpu": 2,
        "train_batch_size": 2 * world,
        "steps_per_print": 1_000_000,
    }


def measure(strategy: str, config: object, world: int, rank: int) -> int:
    """Build, wrap, step once, backward again; return the bytes the wrapped model and optimizer hold."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if strategy == "ddp":
        engine = torch.nn.parallel.DistributedDataParallel(model)
    else:
        stage = {"zero2": 2, "zero3": 3}[strategy]
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=zero_config(stage, config.hidden_size, world)
        )
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(rank))
    for step in range(2):
        loss = engine(input_ids=ids, labels=ids).loss
        if strategy == "ddp":
            loss.backward()
        else:
            engine.backward(loss)
        del loss
        if step == 0:  # the first step creates Adam's states; the second backward refills the gradients
            if strategy == "ddp":
                optimizer.step()
                optimizer.zero_grad()
            else:
                engine.step()
    return held_bytes(engine, optimizer)


def main() -> None:
    import deepspeed
    from transformers import AutoConfig

    strategies, model_dir, out_dir = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
    deepspeed.init_distributed(dist_backend="gloo")  # DDP uses the same default group
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    assert world == int(os.environ["WORLD_SIZE"]) == 2, "expected one real 2-process group"
    config = AutoConfig.from_pretrained(model_dir)
    config.use_cache = False
    rows = []
    for strategy in strategies:
        held = measure(strategy, config, world, rank)
        rows.append({"rank": rank, "world": world, "strategy": strategy, "bytes": held})
        torch.distributed.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
