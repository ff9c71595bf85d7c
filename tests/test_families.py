"""Every architecture of the family matrix (tests/families.py), dense and MoE, through what users run: a packed
full step and a LoRA step of `sftdist train`, packing isolation on the model `train` loads, export of a checkpoint
loaded back by transformers with equal logits, merge-adapter equal to peft's merge, `plan`; QLoRA keeping MoE
routers unquantized; the MoE load-balancing loss on by default and reaching the router's gradients.

Each family's two runs train once per session (`_run`) and are shared by the tests that read them. The CLI
commands run in this process (click's runner calls the very command functions `sftdist` calls), since a
subprocess per run would cost seconds of imports each.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from families import FAMILIES, MOE

from sftdist.cli import cli
from sftdist.errors import EXIT_USER_ERROR, UserError
from sftdist.model import MASK_WITHOUT_POSITIONS, ROUTER_NAMES

_runs: dict[tuple[str, str], tuple[Path, str]] = {}
# transformers' classes that implement neither flash attention 2 on this machine nor sdpa: `auto` says eager.
EAGER_ONLY = ("gemma2", "gpt_oss")


def _recipe(model: Path, out: Path, method: str, packing: bool = True, **train: Any) -> dict:
    return {
        "model": {"name_or_path": str(model)},
        "method": method,
        "data": {"train": [{"path": str(_ROWS[0]), "limit": 16}], "max_length": 128, "packing": packing},
        "train": {"max_steps": 1, "save_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
                  "logging_steps": 1, "report_to": [], "seed": 0, **train},
        "output_dir": str(out),
    }  # fmt: skip


_ROWS: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _rows(demo_rows: Path) -> None:
    _ROWS[:] = [demo_rows]


def _cli(*args: str) -> tuple[int, str]:
    """(exit code, output) of `sftdist ARGS` as `sftdist.cli.main` ends it (a UserError: its line, exit 2)."""
    result = CliRunner().invoke(cli, list(args))
    if isinstance(result.exception, UserError):
        return EXIT_USER_ERROR, f"{result.output}error: {result.exception}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _run(tmp_path_factory: pytest.TempPathFactory, families: dict[str, Path], family: str, method: str) -> tuple[Path, str]:
    """`sftdist train` of the default recipe (only the model, data and a 1-step schedule set), once per session:
    (output_dir, what it printed). Models whose sdpa/eager mask ignores positions train unpacked (on CPU)."""
    if (family, method) not in _runs:
        root = tmp_path_factory.mktemp(f"{family}-{method}")
        recipe = root / "recipe.yaml"
        packing = family not in MASK_WITHOUT_POSITIONS
        recipe.write_text(yaml.safe_dump(_recipe(families[family], root / "run", method, packing)))
        code, output = _cli("train", str(recipe))
        assert code == 0, output[-3000:]
        _runs[family, method] = root / "run", output
    return _runs[family, method]


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 40, 7, 300, 12, 999, 5, 64, 700, 33]])  # inside the tiny vocabulary (~1k)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_full_step_and_lora_step(family: str, families: dict[str, Path], tmp_path_factory) -> None:
    from sftdist.model import is_moe, read_config

    config = read_config(str(families[family]))
    for method in ("full", "lora"):
        out, printed = _run(tmp_path_factory, families, family, method)
        logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
        assert logs[0]["step"] == 1 and math.isfinite(logs[0]["loss"]), logs
        run = json.loads((out / "sftdist_run.json").read_text())
        assert run["distributed"]["num_processes"] == 1
        # `auto` names the attention it fell back to when the class lacks the faster one, and only then.
        assert ("sftdist: attention eager" in printed) == (family in EAGER_ONLY), printed[-2000:]
        coef = getattr(config.get_text_config(), "router_aux_loss_coef", 0) or 0
        # MoE: the load-balancing loss is on at the model's own coefficient and logged beside the loss.
        assert ("aux_loss" in logs[0]) == (is_moe(config) and coef > 0), logs[0]
    if family in MASK_WITHOUT_POSITIONS:  # packing is refused in one line, before anything is written
        recipe = tmp_path_factory.mktemp(f"{family}-packed") / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(_recipe(families[family], recipe.parent / "run", "lora")))
        code, printed = _cli("train", str(recipe))
        assert code == 2 and "data.packing needs flash attention" in printed, printed
        assert not (recipe.parent / "run").exists()
    adapter = json.loads((out / "checkpoint-1" / "adapter_config.json").read_text())
    targets = adapter["target_modules"]
    if is_moe(config):  # all-linear: the attention and dense linears, never a router or the fused experts
        assert isinstance(targets, list) and targets and not adapter.get("target_parameters")
        assert not [t for t in targets if t.rsplit(".", 1)[-1] in ROUTER_NAMES or ".experts." in t], targets
    else:
        assert targets == "all-linear" or set(targets)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_keep_samples_apart(family: str, families: dict[str, Path], tmp_path: Path) -> None:
    """Per-sample losses of one packed, padding-free row equal each sample's loss alone, on the model as
    `sftdist train` loads it (its dtype and the attention `auto` picks). For the model types sftdist refuses to
    pack on sdpa/eager, they differ: the entry in MASK_WITHOUT_POSITIONS is still needed."""
    import torch.nn.functional as F

    from sftdist.model import load_model, load_tokenizer
    from sftdist.recipe import recipe_from_dict

    leaks = family in MASK_WITHOUT_POSITIONS
    recipe = recipe_from_dict(_recipe(families[family], tmp_path / "run", "full", not leaks), source="recipe")
    tokenizer = load_tokenizer(recipe)
    model = load_model(recipe, tokenizer).eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    samples = [torch.randint(5, vocab, (n,), generator=g) for n in (17, 9, 30)]
    ids = torch.cat(samples)[None]
    positions = torch.cat([torch.arange(len(s)) for s in samples])[None]

    def losses(logits: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:-1].float(), s[1:], reduction="none")

    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions).logits[0]
        starts = torch.tensor([0, *map(len, samples)]).cumsum(0).tolist()
        same = [torch.allclose(losses(packed[a:b], s), losses(model(input_ids=s[None]).logits[0], s), atol=1e-4)
                for s, a, b in zip(samples, starts, starts[1:])]  # fmt: skip
    assert same == [True] * len(samples) if not leaks else not all(same), same


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_back_with_equal_logits(family: str, families: dict[str, Path], tmp_path_factory) -> None:
    out, _ = _run(tmp_path_factory, families, family, "full")
    exported = tmp_path_factory.mktemp(f"{family}-export") / "model"
    code, printed = _cli("export", str(out / "checkpoint-1"), "--out", str(exported))
    assert code == 0, printed
    assert torch.equal(_logits(exported, IDS), _logits(out / "final", IDS))


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_adapter_equals_peft_merge(family: str, families: dict[str, Path], tmp_path_factory) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = _run(tmp_path_factory, families, family, "lora")
    merged = tmp_path_factory.mktemp(f"{family}-merged") / "model"
    # --no-verify: its check against peft (base + adapter) is what this test does itself.
    code, printed = _cli("merge-adapter", "--base", str(families[family]), "--adapter", str(out / "checkpoint-1"),
                         "--out", str(merged), "--no-verify")  # fmt: skip
    assert code == 0, printed
    base = AutoModelForCausalLM.from_pretrained(families[family], dtype=torch.float32)
    vocab = AutoTokenizer.from_pretrained(out / "checkpoint-1")
    if len(vocab) > base.get_input_embeddings().num_embeddings:  # training added tokens (model.load_model)
        base.resize_token_embeddings(len(vocab), pad_to_multiple_of=64, mean_resizing=False)
    with torch.no_grad():
        base_logits = base.eval()(input_ids=IDS).logits
    peft_model = PeftModel.from_pretrained(base, out / "checkpoint-1").eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=IDS).logits
        theirs = peft_model.merge_and_unload()(input_ids=IDS).logits
    ours = _logits(merged, IDS)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, base_logits, atol=1e-5)  # the adapter trained: not the base
    assert torch.allclose(ours, adapted, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_plan(family: str, families: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(families[family], tmp_path / "run", "lora")))
    code, printed = _cli("plan", str(recipe), "--gpus", "1", "--gpu-memory", "80GB")
    assert code == 0, printed
    assert "recommended" in printed.lower(), printed


@pytest.mark.parametrize("family", MOE)
def test_qlora_keeps_routers_and_tiny_layers_in_compute_dtype(family: str, families: dict[str, Path], tmp_path: Path):
    import bitsandbytes as bnb

    from sftdist.model import load_model, load_tokenizer
    from sftdist.recipe import recipe_from_dict

    packing = family not in MASK_WITHOUT_POSITIONS
    recipe = recipe_from_dict(_recipe(families[family], tmp_path / "run", "qlora", packing), source="recipe")
    model = load_model(recipe, load_tokenizer(recipe))
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized  # the attention is 4-bit
    routers = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ROUTER_NAMES]
    assert routers
    for name, module in routers:
        assert name not in quantized and all(p.dtype == torch.float32 for p in module.parameters()), name
    small = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features < 32]
    assert not set(small) & quantized
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=IDS).logits).all()


def test_aux_loss_reaches_the_router_gradients(families: dict[str, Path], tmp_path: Path) -> None:
    """The load-balancing loss is on by default at the model's own coefficient, and it changes the router's
    gradient: the same batch with `train.router_aux_loss_coef: 0` gives another one."""
    from sftdist.data.pipeline import prepare
    from sftdist.model import load_model, load_tokenizer, read_config
    from sftdist.recipe import recipe_from_dict
    from sftdist.train import build_sft_config, build_trainer

    default = read_config(str(families["mixtral"])).router_aux_loss_coef
    grads = {}
    for coef in (None, 0.0):
        extra = {} if coef is None else {"router_aux_loss_coef": coef}
        recipe = recipe_from_dict(_recipe(families["mixtral"], tmp_path / f"run{coef}", "full", **extra), source="r")
        tokenizer = load_tokenizer(recipe)
        data = prepare(recipe, lambda: tokenizer, progress=False)
        trainer = build_trainer(recipe, build_sft_config(recipe), tokenizer, data, load_model(recipe, tokenizer))
        assert trainer.router_aux_loss_coef == (default if coef is None else 0.0)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.train()
        trainer.compute_loss(trainer.model, batch).backward()
        grads[coef] = trainer.model.model.layers[0].mlp.gate.weight.grad.clone()
    assert default > 0
    assert not torch.allclose(grads[None], grads[0.0], rtol=0, atol=1e-8)


@pytest.mark.parametrize(("model", "total", "active"), [
    ("mistralai/Mixtral-8x7B-v0.1", 46.7e9, 12.9e9),
    ("Qwen/Qwen3-30B-A3B", 30.5e9, 3.3e9),
])  # fmt: skip
def test_plan_counts_active_and_total_parameters_of_published_moe_models(model, total, active, tmp_path) -> None:
    """Memory follows the total, compute the active parameters (top-k of the routed experts): both match the
    model cards' figures, counted from the published config.json (tests/fixtures/published)."""
    from conftest import FIXTURES

    from sftdist.plan import count_model
    from sftdist.recipe import recipe_from_dict

    config_dir = FIXTURES / "published" / model
    raw = _recipe(config_dir, tmp_path / "run", "full")
    counts = count_model(recipe_from_dict(raw, source="recipe"))
    # The cards give one decimal, rounded (Mixtral: 12.88B -> 12.9B) or cut (Qwen3: 3.35B -> 3.3B).
    assert math.isclose(counts.total, total, abs_tol=0.06e9) and math.isclose(counts.active, active, abs_tol=0.06e9)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code, printed = _cli("plan", str(recipe), "--gpus", "8", "--gpu-memory", "80GB")
    assert f"{counts.active / 1e9:.2f}B active per token" in printed, printed  # 8 x 80GB: fits or not


def test_mfu_counts_the_active_experts(families: dict[str, Path]) -> None:
    """The MFU's FLOPs per token count a routed expert's weights at k/n (2 of 4 here), the dense ones whole."""
    from transformers import AutoModelForCausalLM

    from sftdist.moe import active_parameters
    from sftdist.throughput import flops_per_token

    model = AutoModelForCausalLM.from_pretrained(families["mixtral"])
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings())  # fmt: skip
    assert flops_per_token(model, 1.0, 1.0).linear == 6 * (linears + experts / 2)
    assert active_parameters(model) == sum(p.numel() for p in model.parameters()) - experts / 2


# The dense family under both: the tiny Llama of test_distributed, compared there with one process step by step.
@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
@pytest.mark.parametrize("family", ["mixtral"])
def test_two_processes_shard_moe(strategy: str, family: str, families: dict[str, Path], tmp_path: Path):
    """`sftdist launch` on 2 processes trains an MoE family under ZeRO-3 (gathering the sparse MoE block whole)
    and FSDP2, and the sharded checkpoint exports to a model with the final model's logits."""
    from conftest import run_cli

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(families[family], tmp_path / "run", "full", per_device_train_batch_size=2)))
    proc = run_cli("launch", str(recipe), "--strategy", strategy, "--num-processes", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "sftdist_run.json").read_text())["distributed"]
    assert (state["distributed_type"], state["num_processes"]) == ({"zero3": "DEEPSPEED", "fsdp2": "FSDP"}[strategy], 2)
    leaf = "ZeRO-3 gathers each MixtralSparseMoeBlock whole (leaf module)" in proc.stdout
    assert leaf == (strategy == "zero3" and family == "mixtral"), proc.stdout[-2000:]
    code, printed = _cli("export", str(tmp_path / "run" / "checkpoint-1"), "--out", str(tmp_path / "export"))
    assert code == 0, printed
    assert torch.allclose(_logits(tmp_path / "export", IDS), _logits(tmp_path / "run" / "final", IDS), atol=1e-5)


def test_attention_the_class_lacks_is_one_line(families: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    raw = _recipe(families["gemma2"], tmp_path / "run", "full")
    recipe.write_text(yaml.safe_dump({**raw, "model": {**raw["model"], "attn_implementation": "sdpa"}}))
    code, printed = _cli("train", str(recipe))
    assert code == 2 and "model.attn_implementation=sdpa is not implemented by Gemma2ForCausalLM" in printed, printed
    assert not (tmp_path / "run").exists()


def test_lora_target_parameters_adapt_the_fused_experts(families: dict[str, Path], tmp_path: Path) -> None:
    """peft's own `target_parameters` reaches the experts that `all-linear` leaves out, with dropout 0 (peft's
    condition, refused in one line otherwise)."""
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    raw = _recipe(families["qwen3_moe"], tmp_path / "run", "lora")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**raw, "lora": {"target_parameters": experts}}))
    code, printed = _cli("train", str(recipe))
    assert code == 2 and "lora.target_parameters needs lora.dropout: 0" in printed, printed
    recipe.write_text(yaml.safe_dump({**raw, "lora": {"target_parameters": experts, "dropout": 0.0}}))
    code, printed = _cli("train", str(recipe))
    assert code == 0, printed[-3000:]
    adapter = json.loads((tmp_path / "run" / "checkpoint-1" / "adapter_config.json").read_text())
    assert sorted(adapter["target_parameters"]) == sorted(experts)
    from safetensors import safe_open

    with safe_open(tmp_path / "run" / "checkpoint-1" / "adapter_model.safetensors", "pt") as f:
        assert any("experts" in k for k in f.keys()), list(f.keys())
