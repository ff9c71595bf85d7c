"""`sftdist launch` without training: the shipped configs pass accelerate's and DeepSpeed's own
validators, strategies map to the right files, the command and environment are built as lists
(what --dry-run prints), and bad flags fail as one-line errors before anything starts."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from sftdist.errors import UserError
from sftdist.launcher import build_launch
from sftdist.strategies import STRATEGIES, config_paths

DS_FILES = sorted((REPO / "deepspeed_configs").glob("*.json"))
ACC_FILES = sorted((REPO / "accelerate_configs").glob("*.yaml"))


@pytest.fixture
def recipe(tmp_path: Path) -> str:
    """A valid recipe; nothing is loaded from its paths by the launcher."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": "models/tiny"},
        "data": {"train": [{"path": "data.jsonl"}]},
        "output_dir": str(tmp_path / "run"),
    }))
    return str(path)


def filled_deepspeed_config(path: Path, grad_accum: int = 2) -> dict:
    """The JSON with "auto" filled by transformers' own code, as the trainer does it."""
    from transformers import AutoConfig, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args = TrainingArguments(
        output_dir=str(path.parent), per_device_train_batch_size=2, gradient_accumulation_steps=grad_accum,
        max_grad_norm=0.5, use_cpu=True, report_to=[],
    )
    hf = HfTrainerDeepSpeedConfig(json.loads(path.read_text()))
    hf.trainer_config_process(args)

    class Model:  # trainer_config_finalize reads only model.config (hidden sizes for bucket "auto"s)
        config = AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4)

    hf.trainer_config_finalize(args, Model(), num_training_steps=10)
    return hf.config


def test_every_strategy_has_shipped_configs():
    assert {p.stem for p in ACC_FILES} == {"single", "ddp", "fsdp2", "zero1", "zero2", "zero3", "zero3_offload"}
    assert {p.stem for p in DS_FILES} == {"zero1", "zero2", "zero3", "zero3_offload"}
    for name, (acc, ds) in STRATEGIES.items():
        acc_path, ds_path = config_paths(name)
        # The package reaches the top-level folders (symlinks), so the wheel and the repo ship one copy.
        assert acc_path == (REPO / "accelerate_configs" / acc).resolve()
        assert ds_path == ((REPO / "deepspeed_configs" / ds).resolve() if ds else None)


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.stem)
def test_deepspeed_config_passes_deepspeeds_validation(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert raw[key] == "auto", key  # the trainer's values win, never a second copy here
    assert raw["bf16"]["enabled"] == raw["fp16"]["enabled"] == "auto"

    ds = DeepSpeedConfig(filled_deepspeed_config(path))
    stage = int(path.stem[4])
    assert ds.zero_optimization_stage == stage
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (4, 2, 2)
    assert ds.gradient_clipping == 0.5
    assert not ds.bfloat16_config.enabled and not ds.float16_config.enabled
    if stage == 3:
        assert ds.zero_config.gather_16bit_weights_on_model_save
    offload = path.stem.endswith("offload")
    assert (ds.zero_config.offload_optimizer is not None and ds.zero_config.offload_optimizer.device == "cpu") == offload
    assert (ds.zero_config.offload_param is not None and ds.zero_config.offload_param.device == "cpu") == offload


def test_deepspeed_validation_rejects_a_bad_key():
    """The check above has teeth: deepspeed refuses an unknown ZeRO key."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = filled_deepspeed_config(REPO / "deepspeed_configs" / "zero3.json")
    cfg["zero_optimization"]["stage3_gather_weights_on_save"] = True
    with pytest.raises(Exception, match="stage3_gather_weights_on_save"):
        DeepSpeedConfig(cfg)


@pytest.mark.parametrize("path", ACC_FILES, ids=lambda p: p.stem)
def test_accelerate_config_passes_accelerates_loader(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    cfg = load_config_from_file(str(path))
    expected = {"single": "NO", "ddp": "MULTI_GPU", "fsdp2": "FSDP"}.get(path.stem, "DEEPSPEED")
    assert cfg.distributed_type.value == expected  # never MULTI_CPU: it starts one process on CPU
    assert cfg.use_cpu is False and cfg.mixed_precision is None
    # Nested keys are not checked by the loader: each must be an `accelerate launch` option.
    options = {a.dest for a in launch_command_parser()._actions}
    for key in (*cfg.deepspeed_config, *cfg.fsdp_config):
        assert key in options, key
    if expected == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    if expected == "DEEPSPEED":
        assert cfg.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
        assert (REPO / cfg.deepspeed_config["deepspeed_config_file"]) == REPO / "deepspeed_configs" / f"{path.stem}.json"
        assert cfg.deepspeed_config["zero3_init_flag"] == path.stem.startswith("zero3")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero1", "zero2", "zero3", "zero3-offload"])
def test_cpu_plan_is_really_distributed(recipe, strategy):
    plan = build_launch(recipe, strategy, num_processes=2, gpus=0)
    acc, ds = config_paths(strategy)
    argv = plan.argv
    assert argv[:6] == ["--config_file", str(acc), "--num_processes", "2", "--num_machines", "1"]
    assert argv[-4:] == ["-m", "sftdist", "train", recipe]
    assert "--cpu" not in argv and "--machine_rank" not in argv
    if ds:
        assert argv[argv.index("--deepspeed_config_file") + 1] == str(ds)
        # ACCELERATE_USE_CPU=true would silently replace DeepSpeed by plain DDP.
        assert plan.env["ACCELERATE_USE_CPU"] == "false"
        assert plan.env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == strategy[4]
    else:
        assert plan.env["ACCELERATE_USE_CPU"] == "true"
    assert "SIGUSR1" in plan.env["PET_SIGNALS_TO_HANDLE"].split(",")


def test_shipped_configs_work_from_any_directory(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = build_launch(recipe, "zero3", num_processes=2, gpus=0)
    assert plan.env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"


def test_gpu_plan_uses_every_visible_gpu(recipe):
    plan = build_launch(recipe, "zero3", gpus=8)
    assert plan.argv[plan.argv.index("--num_processes") + 1] == "8"
    assert "ACCELERATE_USE_CPU" not in plan.env and "--num_cpu_threads_per_process" not in plan.argv
    with pytest.raises(UserError, match="only 8 GPU"):
        build_launch(recipe, "ddp", num_processes=9, gpus=8)


def test_multi_machine_fields_come_from_flags(recipe):
    plan = build_launch(
        recipe, "fsdp2", num_processes=4, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", gpus=4,
        overrides=["train.max_steps=5"], train_flags=["--no-resume"], accelerate_args=["--rdzv_backend", "c10d"],
    )
    a = plan.argv
    assert a[a.index("--num_processes") + 1] == "8"  # total over machines, as accelerate counts
    assert a[a.index("--num_machines") + 1] == "2" and a[a.index("--machine_rank") + 1] == "1"
    assert a[a.index("--main_process_ip") + 1] == "10.0.0.1" and a[a.index("--main_process_port") + 1] == "29500"
    assert a[a.index("-m") - 2:] == [
        "--rdzv_backend", "c10d", "-m", "sftdist", "train", recipe, "--set", "train.max_steps=5", "--no-resume"
    ]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strategy": "zero4"}, "unknown strategy; expected one of single, ddp"),
        ({"strategy": "ddp"}, "no GPU is visible; pass --num-processes"),
        ({"strategy": "single", "num_processes": 2}, "runs one process"),
        ({"strategy": "ddp", "num_processes": 0}, "expected at least 1"),
        ({"strategy": "ddp", "num_processes": 1, "num_machines": 2}, "needs --main-process-ip"),
        ({"strategy": "ddp", "num_processes": 1, "num_machines": 2, "machine_rank": 2}, "expected 0 to 1"),
        ({"strategy": "missing.yaml"}, "accelerate config file not found"),
        ({"strategy": "ddp", "num_processes": 2, "accelerate_args": ["extra"]}, "options go after --"),
    ],
)
def test_bad_flags_are_user_errors(recipe, kwargs, message):
    with pytest.raises(UserError, match=message):
        build_launch(recipe, gpus=0, **kwargs)


def test_user_configs_that_fail_silently_on_cpu_are_refused(recipe, tmp_path):
    base = yaml.safe_load((REPO / "accelerate_configs" / "fsdp2.yaml").read_text())
    cases = {
        "multi_cpu.yaml": ({**base, "distributed_type": "MULTI_CPU", "fsdp_config": {}}, "starts a single process"),
        "fsdp1.yaml": ({**base, "fsdp_config": {**base["fsdp_config"], "fsdp_version": 1}}, "set fsdp_config.fsdp_version: 2"),
        "typo.yaml": ({**base, "num_procesess": 2}, "not a valid accelerate config"),
    }
    for name, (cfg, message) in cases.items():
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        with pytest.raises(UserError, match=message):
            build_launch(recipe, str(path), num_processes=2, gpus=0)
    ok = tmp_path / "mine.yaml"
    ok.write_text(yaml.safe_dump({**base, "distributed_type": "MULTI_GPU", "fsdp_config": {}}))
    plan = build_launch(recipe, str(ok), num_processes=2, gpus=0)
    assert plan.kind == "ddp" and plan.env["ACCELERATE_USE_CPU"] == "true"
    ds = yaml.safe_load((REPO / "accelerate_configs" / "zero2.yaml").read_text())
    ds["deepspeed_config"]["deepspeed_config_file"] = str(REPO / "deepspeed_configs" / "zero3.json")
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump(ds))
    plan = build_launch(recipe, str(tmp_path / "ds.yaml"), num_processes=2, gpus=0)
    assert (plan.kind, plan.env["ACCELERATE_DEEPSPEED_ZERO_STAGE"], plan.env["ACCELERATE_USE_CPU"]) == ("deepspeed", "3", "false")


def test_dry_run_prints_the_exact_command_and_starts_nothing(recipe, tmp_path):
    proc = run_cli("launch", recipe, "--strategy", "zero2", "--num-processes", "2", "--set", "train.max_steps=3",
                   "--dry-run", "--", "--rdzv_backend", "c10d")
    assert proc.returncode == 0, proc.stderr
    plan = build_launch(recipe, "zero2", num_processes=2, overrides=["train.max_steps=3"],
                       accelerate_args=["--rdzv_backend", "c10d"])
    assert proc.stdout.strip() == plan.render()
    words = shlex.split(proc.stdout)
    assert words[: 1 + len(plan.env)] == ["env", *(f"{k}={v}" for k, v in sorted(plan.env.items()))]
    assert words[1 + len(plan.env):] == ["accelerate", "launch", *plan.argv]
    assert not (tmp_path / "run").exists()


def test_bad_launch_is_one_line_exit_2(recipe, tmp_path):
    proc = run_cli("launch", recipe, "--strategy", "ddp", "--num-processes", "2", "--num-machines", "2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --num-machines > 1 needs --main-process-ip (the address of the machine with rank 0)"
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: m}\ndata: {train: [{path: d.jsonl}]}\ntrian: {}\n")
    proc = run_cli("launch", str(bad), "--strategy", "ddp", "--num-processes", "2")
    assert proc.returncode == 2 and "unknown recipe key 'trian'; did you mean 'train'?" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
