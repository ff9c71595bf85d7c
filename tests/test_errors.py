"""Every user mistake the issue lists, through the real CLI: exit code 2, one `error:` line on stderr
that names the file/row/key and what was expected, no traceback, and nothing written.

Each case builds its own directory (data, recipe, and sometimes a pre-existing output_dir), then the
whole directory is compared byte for byte after the run: an error may not write, create or remove
anything. The subprocesses are independent, so they run a few at a time (most of each one's time
is importing torch); each test then checks its own result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from conftest import GPT2_TINY, REPO, run_cli, signal_at_first_loss
from sftdist.errors import EXIT_PREEMPTED
from sftdist.rundir import COMPLETE_MARKER, write_manifest

GOOD = {"instruction": "Say hi.", "context": "", "response": "Hi."}
LONG = {"instruction": "Count.", "context": "", "response": " ".join(["one two three four five"] * 20)}


class Ctx:
    """What a case may need besides its own directory; the adapter is built only when a case asks for it."""

    def __init__(self, tiny: Path, root: Path) -> None:
        self.tiny = tiny
        self.root = root
        self._adapter: Path | None = None

    @property
    def adapter(self) -> Path:
        """A peft LoRA adapter of the tiny model, saved as a run's final/ would be."""
        if self._adapter is None:
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.tiny)
            lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
            self._adapter = self.root / "adapter"
            get_peft_model(model, lora).save_pretrained(self._adapter)
        return self._adapter

    def narrow_llama(self, d: Path) -> Path:
        """The tiny model's layout with half the width: same architecture, other shapes."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.tiny)
        config.hidden_size, config.intermediate_size, config.head_dim = 64, 256, 16
        out = d.parent / "narrow-llama"  # beside the case dir: an input, not an output
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        return out


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe(d: Path, model: Path | str, sources: list[dict], **extra: Any) -> str:
    raw: dict[str, Any] = {
        "model": {"name_or_path": str(model)},
        "data": {"train": sources, "max_length": 64},
        "train": {"max_steps": 1, "report_to": []},
        "output_dir": str(d / "run"),
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return str(path)


def data_check(d: Path, ctx: Ctx, rows: list[Any] | None = None, name: str = "data.jsonl",
               model: Path | str | None = None, **extra: Any) -> list[str]:
    """`sftdist data --check` on one source of `rows` (or the file `name` the case wrote), tiny model by default."""
    src = jsonl(d / name, rows) if rows is not None else d / name
    return ["data", "--check", recipe(d, model or ctx.tiny, [{"path": str(src)}], **extra)]


def train(d: Path, ctx: Ctx, model: Path | str | None = None, **extra: Any) -> list[str]:
    """`sftdist train` on two good rows, tiny model by default."""
    src = jsonl(d / "data.jsonl", [GOOD, GOOD])
    return ["train", recipe(d, model or ctx.tiny, [{"path": str(src)}], **extra)]


# name -> builder(case_dir, ctx) -> (argv, words the error line must contain[, environment to add])
Case = Callable[[Path, Ctx], tuple[Any, ...]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


# --- data (1-12) ------------------------------------------------------------------------------------
@case
def c01_data_path_missing(d, ctx):
    return data_check(d, ctx, name="missing.jsonl"), ("missing.jsonl", "data path does not exist")


@case
def c02_data_file_empty(d, ctx):
    (d / "empty.jsonl").write_text("")
    return data_check(d, ctx, name="empty.jsonl"), ("empty.jsonl", "empty")


@case
def c03_line_not_json(d, ctx):
    return data_check(d, ctx, [GOOD, GOOD, '{"instruction": "x", '], "bad.jsonl"), ("bad.jsonl", "line 3", "not valid JSON")


@case
def c04_row_missing_field(d, ctx):
    rows = [GOOD, {"instruction": "No answer here.", "context": ""}]
    return data_check(d, ctx, rows), ("data.jsonl", "line 2", "missing field 'response'")


@case
def c05_columns_match_no_format(d, ctx):
    rows = [{"question": "Why?", "answer": "Because."}]
    return data_check(d, ctx, rows), ("'answer', 'question'", "match no known format", "dolly (instruction, response)", "messages (messages)")


@case
def c06_response_is_a_list(d, ctx):
    rows = [{"instruction": "List.", "response": ["a", "b"]}]
    return data_check(d, ctx, rows), ("line 1", "field 'response' is a list", "expected a string")


@case
def c06_messages_is_a_string(d, ctx):
    return data_check(d, ctx, [{"messages": "hello"}]), ("line 1", "field 'messages' is a str", "expected a list")


@case
def c07_every_response_empty(d, ctx):
    rows = [{**GOOD, "response": ""}, {**GOOD, "response": "  "}]
    return data_check(d, ctx, rows), ("data.jsonl", "every one of its 2 rows", "empty response")


@case
def c08_every_sample_too_long(d, ctx):
    return data_check(d, ctx, [LONG, LONG], data={"max_length": 16}), (
        "data.jsonl", "all 2 samples", "max_length=16", "data.truncate")


@case
def c09_bytes_not_utf8(d, ctx):
    (d / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b'\n{"instruction": "caf\xe9", "response": "x"}\n')
    return data_check(d, ctx, name="latin1.jsonl"), ("latin1.jsonl", "line 2", "not UTF-8")


@case
def c10_no_assistant_turn(d, ctx):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}]
    return data_check(d, ctx, rows), ("line 1", "no assistant turn")


@case
def c10_unknown_role(d, ctx):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}]
    return data_check(d, ctx, rows), ("line 1", "messages[1]", "unknown role 'bot'", "system, user, assistant")


@case
def c10_ends_on_user_turn(d, ctx):
    turns = [("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")]
    rows = [{"messages": [{"role": r, "content": c} for r, c in turns]}]
    return data_check(d, ctx, rows), ("line 1", "ends on a user turn", "assistant turn")


@case
def c11_chat_format_without_template(d, ctx):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    return data_check(d, ctx, rows, model=GPT2_TINY), ("data.jsonl line 1", "chat rows need a chat template",
                                                        "gpt2-tiny-random", "data.chat_template")


@case
def c10_template_drops_reasoning(d, ctx):
    rows = [{"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4", "reasoning_content": "add them"}]}]
    return data_check(d, ctx, rows, data={"chat_template": "llama3"}), (
        "data.jsonl line 1", "does not render reasoning", "'add them' is missing", "data.chat_template")


@case
def c12_eval_fraction_leaves_no_training_rows(d, ctx):
    return data_check(d, ctx, [GOOD], data={"eval_fraction": 0.5}), ("recipe.yaml", "eval_fraction=0.5", "no training rows")


@case
def c12_eval_fraction_out_of_range(d, ctx):
    return data_check(d, ctx, [GOOD], data={"eval_fraction": 1.0}), ("recipe.yaml", "data.eval_fraction", "0 <= x < 1")


@case
def c12_cache_location_is_a_file(d, ctx):
    (d / "cache").write_text("not a directory")
    return data_check(d, ctx, [GOOD]), ("cache", "not a directory", "$SFTDIST_CACHE"), {"SFTDIST_CACHE": str(d / "cache")}


# --- recipe and model (13-20) -----------------------------------------------------------------------
@case
def c13_unknown_key_nested(d, ctx):
    argv = train(d, ctx)
    raw = yaml.safe_load(Path(argv[1]).read_text())
    raw["data"]["max_lenght"] = raw["data"].pop("max_length")
    Path(argv[1]).write_text(yaml.safe_dump(raw))
    return argv, ("recipe.yaml", "'data.max_lenght'", "did you mean 'max_length'")


@case
def c13_unknown_key_in_source(d, ctx):
    argv = train(d, ctx)
    raw = yaml.safe_load(Path(argv[1]).read_text())
    raw["data"]["train"][0]["pth"] = raw["data"]["train"][0].pop("path")
    Path(argv[1]).write_text(yaml.safe_dump(raw))
    return argv, ("recipe.yaml", "'data.train[0].pth'", "did you mean 'path'")


@case
def c13_unknown_train_key(d, ctx):
    return train(d, ctx, train={"learning_rat": 1e-3}), ("recipe.yaml", "'train.learning_rat'", "did you mean 'learning_rate'")


@case
def c13_unknown_key_by_set(d, ctx):
    return train(d, ctx) + ["--set", "lora.alfa=8"], ("recipe.yaml", "'lora.alfa'", "did you mean 'alpha'")


@case
def c14_wrong_type_train(d, ctx):
    return train(d, ctx, train={"learning_rate": "fast"}), ("recipe.yaml", "train.learning_rate", "'fast'", "expected a number")


@case
def c14_wrong_type_recipe(d, ctx):
    return train(d, ctx, data={"packing": "sometimes"}), ("recipe.yaml", "data.packing", "'sometimes'", "expected true or false")


@case
def c15_unknown_method(d, ctx):
    return train(d, ctx, method="dpo"), ("recipe.yaml", "method", "'dpo'", "full, lora, qlora")


@case
def c15_unknown_format(d, ctx):
    argv = train(d, ctx)
    raw = yaml.safe_load(Path(argv[1]).read_text())
    raw["data"]["train"][0]["format"] = "chatml"
    Path(argv[1]).write_text(yaml.safe_dump(raw))
    return argv, ("recipe.yaml", "data.train[0].format", "'chatml'", "prompt_completion, dolly, alpaca, messages")


@case
def c15_unknown_template(d, ctx):
    return train(d, ctx, data={"template": "vicuna"}), ("recipe.yaml", "data.template", "'vicuna'", "default, alpaca")


@case
def c15_unknown_chat_template(d, ctx):
    return train(d, ctx, data={"chat_template": "llama9"}), ("recipe.yaml", "data.chat_template", "'llama9'", "chatml")


@case
def c15_unknown_strategy(d, ctx):
    argv = ["launch", train(d, ctx)[1], "--strategy", "zero4", "--num-processes", "2", "--dry-run"]
    return argv, ("--strategy zero4", "unknown strategy", "single, ddp, zero1, zero2, fsdp2, zero3, zero3-offload")


@case
def c16_model_path_missing(d, ctx):
    return train(d, ctx, model=d / "no-such-model"), ("no-such-model", "model path does not exist")


@case
def c16_model_dir_without_config(d, ctx):
    (d / "weights-only").mkdir()
    shutil.copy(ctx.tiny / "model.safetensors", d / "weights-only")
    return train(d, ctx, model=d / "weights-only"), ("weights-only", "no config.json", "not a model directory")


@case
def c17_max_length_above_context(d, ctx):
    return train(d, ctx, data={"max_length": 4096}), ("recipe.yaml", "data.max_length=4096", "context", "2048 tokens")


@case
def c18_qlora_without_4bit_kernels(d, ctx):
    # bitsandbytes' CPU 4-bit kernels need output sizes divisible by 32; this GPT-2 is 2 wide.
    return train(d, ctx, model=GPT2_TINY, method="qlora"), ("gpt2-tiny-random", "qlora", "divisible by 32", "method: lora")


@case
def c19_bf16_without_gpu(d, ctx):
    return train(d, ctx, train={"bf16": True}), ("recipe.yaml", "train.bf16", "no GPU")


@case
def c19_fp16_without_gpu(d, ctx):
    return train(d, ctx, train={"fp16": True}), ("recipe.yaml", "train.fp16", "no GPU")


@case
def c19_float16_weights_without_gpu(d, ctx):
    return train(d, ctx) + ["--set", "model.dtype=float16"], ("recipe.yaml", "model.dtype", "float16", "no GPU")


@case
def c20_output_dir_of_another_run(d, ctx):
    run = d / "run"
    (run / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoint-4" / COMPLETE_MARKER).write_text('{"global_step": 4}')
    (run / "checkpoint-4" / "model.safetensors").write_bytes(b"weights of another run")
    (run / "sftdist_recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "other"}, "method": "lora"}))
    return train(d, ctx), ("run", "another recipe's run", "--overwrite")


@case
def c20_output_dir_of_foreign_files(d, ctx):
    (d / "run").mkdir()
    (d / "run" / "notes.txt").write_text("mine")
    return train(d, ctx), ("run", "not an sftdist run", "--overwrite")


# --- settings checked before anything is written (preflight.py), by `train` and by `data --check` ---------
@case
def c24_negative_learning_rate(d, ctx):
    return train(d, ctx, train={"learning_rate": -1e-4}), ("recipe.yaml", "train.learning_rate is -0.0001", "positive")


@case
def c24_lora_rank_zero(d, ctx):
    return train(d, ctx, method="lora", lora={"r": 0}), ("recipe.yaml", "lora.r is 0", "positive integer")


@case
def c24_target_modules_match_nothing(d, ctx):
    # c_attn is GPT-2's name; the tiny model is a Llama (q_proj, ...). peft would fail after output_dir is claimed.
    return train(d, ctx, method="lora", lora={"target_modules": ["c_attn"]}), ("recipe.yaml", "lora", "{'c_attn'}", "not found")


@case
def c24_target_modules_match_nothing_data_check(d, ctx):
    argv = data_check(d, ctx, [GOOD], method="qlora", lora={"target_modules": ["c_attn"]})
    return argv, ("recipe.yaml", "lora", "{'c_attn'}", "not found")


@case
def c24_max_shard_size_unparsable(d, ctx):
    # transformers' save_pretrained rejects '1.5GB' only at the first checkpoint.
    return train(d, ctx, max_shard_size="1.5GB"), ("recipe.yaml", "max_shard_size '1.5GB'", "500MB, 5GB or 2GiB")


@case
def c24_max_length_above_context_data_check(d, ctx):
    return data_check(d, ctx, [GOOD], data={"max_length": 4096}), ("recipe.yaml", "data.max_length=4096", "2048 tokens")


# --- values that make no sense, and settings that used to fail after output_dir was written (a trap: the
# corrected rerun was then refused as another recipe's run). Checked before anything is written. -------------
@case
def c26_batch_size_zero(d, ctx):
    return train(d, ctx, train={"per_device_train_batch_size": 0}), (
        "recipe.yaml", "train.per_device_train_batch_size is 0", "positive integer")


@case
def c26_zero_epochs(d, ctx):
    return train(d, ctx, train={"max_steps": -1, "num_train_epochs": 0}), (
        "recipe.yaml", "train.num_train_epochs is 0", "positive number (or set train.max_steps)")


# --- non-finite and insane numbers (round 3): refused before anything is written ------------------------
@case
def r3_learning_rate_inf(d, ctx):
    return train(d, ctx, train={"learning_rate": float("inf")}), (
        "recipe.yaml", "train.learning_rate: got inf", "expected a finite number")


@case
def r3_learning_rate_typo(d, ctx):  # 2e5 for 2e-5 (YAML reads it as a string; typed_train makes it a number)
    return train(d, ctx, train={"learning_rate": "2e5"}), (
        "recipe.yaml", "train.learning_rate is 200000.0", "a positive number up to 1, such as 2e-5")


@case
def r3_weight_decay_inf(d, ctx):
    return train(d, ctx, train={"weight_decay": float("inf")}), ("train.weight_decay: got inf", "expected a finite number")


@case
def r3_epochs_inf(d, ctx):
    return train(d, ctx, train={"max_steps": -1, "num_train_epochs": float("inf")}), (
        "train.num_train_epochs: got inf", "expected a finite number")


@case
def r3_warmup_inf(d, ctx):
    return train(d, ctx, train={"warmup_steps": float("inf")}), ("train.warmup_steps: got inf", "expected a finite number")


@case
def r3_source_weight_nan(d, ctx):
    src = jsonl(d / "data.jsonl", [GOOD, GOOD])
    return ["train", recipe(d, ctx.tiny, [{"path": str(src), "weight": float("nan")}])], (
        "recipe.yaml", "data.train[0].weight", "got nan", "expected a finite number")


@case
def r3_source_weight_huge(d, ctx):
    src = jsonl(d / "data.jsonl", [GOOD, GOOD])
    return ["train", recipe(d, ctx.tiny, [{"path": str(src), "weight": 1e15}])], (
        "recipe.yaml", "data.train[0].weight is 1000000000000000.0", "a positive number up to 1000")


@case
def r3_lora_rank_huge(d, ctx):
    return train(d, ctx, method="lora", lora={"r": 10**15}), (
        "recipe.yaml", "lora.r is 1000000000000000", "expected at most 1024", "hidden size 128")


@case
def c26_save_total_limit_zero(d, ctx):
    return train(d, ctx, train={"save_total_limit": 0}), ("train.save_total_limit is 0", "null: keep every checkpoint")


@case
def c26_negative_limit(d, ctx):
    src = jsonl(d / "data.jsonl", [GOOD, GOOD])
    return ["train", recipe(d, ctx.tiny, [{"path": str(src), "limit": -1}])], (
        "recipe.yaml", "data.train[0].limit is -1", "positive number of rows (null: every row)")


@case
def c26_lora_alpha_zero(d, ctx):
    return train(d, ctx, method="lora", lora={"alpha": 0}), ("recipe.yaml", "lora.alpha is 0", "positive number")


@case
def c26_eval_strategy_without_eval_data(d, ctx):
    return train(d, ctx, train={"eval_strategy": "steps"}), (
        "recipe.yaml", "train.eval_strategy is steps", "no eval data", "data.eval_fraction")


@case
def c26_report_to_not_installed(d, ctx):
    return train(d, ctx, train={"report_to": ["wandb"]}), ("recipe.yaml", "train.report_to names wandb", "not installed")


@case
def c26_sequence_parallel_not_dividing_heads(d, ctx):
    return data_check(d, ctx, [GOOD], sequence_parallel=3), (
        "recipe.yaml", "sequence_parallel 3 does not divide the 4 attention heads", "use one of 2, 4")


@case
def c26_data_cache_inside_output_dir(d, ctx):
    return train(d, ctx, data={"cache_dir": str(d / "run" / "cache")}), (
        "recipe.yaml", "the data cache", "is inside output_dir", "outside output_dir")


@case
def c26_global_batch_and_accumulation(d, ctx):
    return train(d, ctx, global_batch_size=4, train={"gradient_accumulation_steps": 2}), (
        "recipe.yaml", "global_batch_size and train.gradient_accumulation_steps are both set")


# --- flags, range-checked by the CLI before any work ----------------------------------------------------
@case
def c25_generate_temperature_zero(d, ctx):
    return ["generate", str(ctx.tiny), "--prompt", "hi", "--temperature", "0"], ("--temperature", "0.0", "x>0")


@case
def c25_generate_top_p_above_one(d, ctx):
    return ["generate", str(ctx.tiny), "--prompt", "hi", "--top-p", "1.5"], ("--top-p", "1.5", "0<x<=1")


@case
def c25_generate_no_new_tokens(d, ctx):
    return ["generate", str(ctx.tiny), "--prompt", "hi", "--max-new-tokens", "0"], ("--max-new-tokens", "x>=1")


@case
def c25_generate_prompts_file_not_utf8(d, ctx):
    (d / "prompts.txt").write_bytes("Say hi.\n".encode() + b"caf\xe9\n")
    return ["generate", str(ctx.tiny), "--prompts-file", str(d / "prompts.txt")], ("prompts.txt", "line 2", "not UTF-8")


@case
def c25_export_shard_size(d, ctx):
    return ["export", str(ctx.tiny), "--out", str(d / "exported"), "--max-shard-size", "5 gigs"], ("--max-shard-size", "'5 gigs'")


@case
def c25_merge_shard_size(d, ctx):
    argv = ["merge-adapter", "--base", str(ctx.tiny), "--adapter", str(d), "--out", str(d / "merged"),
            "--max-shard-size", "1.5GB"]
    return argv, ("--max-shard-size", "'1.5GB'", "whole number")


@case
def c25_launch_port_out_of_range(d, ctx):
    argv = ["launch", train(d, ctx)[1], "--strategy", "ddp", "--num-processes", "2", "--main-process-port", "70000"]
    return argv, ("--main-process-port", "70000", "1<=x<=65535")


@case
def c25_launch_no_processes(d, ctx):
    return ["launch", train(d, ctx)[1], "--strategy", "ddp", "--num-processes", "0"], ("--num-processes", "x>=1")


# --- export and merge (21-23) -----------------------------------------------------------------------
@case
def c21_adapter_of_another_architecture(d, ctx):
    argv = ["merge-adapter", "--base", str(GPT2_TINY), "--adapter", str(ctx.adapter), "--out", str(d / "merged")]
    return argv, ("model.layers.0", "does not have")


@case
def c21_adapter_of_another_shape(d, ctx):
    base = ctx.narrow_llama(d)
    argv = ["merge-adapter", "--base", str(base), "--adapter", str(ctx.adapter), "--out", str(d / "merged")]
    return argv, ("q_proj", "shape", "(128, 128)")


@case
def c22_merge_out_not_empty(d, ctx):
    (d / "merged").mkdir()
    (d / "merged" / "keep.txt").write_text("mine")
    argv = ["merge-adapter", "--base", str(ctx.tiny), "--adapter", str(ctx.adapter), "--out", str(d / "merged")]
    return argv, ("--out", "merged", "not empty")


@case
def c22_export_out_not_empty(d, ctx):
    (d / "exported").mkdir()
    (d / "exported" / "keep.txt").write_text("mine")
    return ["export", str(ctx.adapter), "--out", str(d / "exported")], ("exported", "not empty")


@case
def c23_export_incomplete_checkpoint(d, ctx):
    ckpt = d / "run" / "checkpoint-3"
    shutil.copytree(ctx.tiny, ckpt)  # whole weights, but the run stopped before the marker
    return ["export", str(ckpt), "--out", str(d / "exported")], ("checkpoint-3", "incomplete", COMPLETE_MARKER)


# --- export, merge-adapter and generate on damaged inputs, and --out where nothing can be built ----------
def export_checkpoint_cut_short(d: Path, src: Path, name: str) -> tuple[list[str], tuple[str, ...]]:
    """`export` of `src`'s files laid out as a checkpoint sftdist wrote (a manifest of them, then the
    completion marker), whose file `name` was cut short since."""
    ckpt = d / "run" / "checkpoint-2"
    shutil.copytree(src, ckpt)
    write_manifest(ckpt)
    (ckpt / COMPLETE_MARKER).write_text('{"global_step": 2}')
    cut_short(ckpt / name)
    return ["export", str(ckpt), "--out", str(d / "exported")], ("checkpoint-2", "damaged", f"{name} has")


def cut_short(path: Path) -> Path:
    """Keep the first half of a file, as a copy or a write that stopped midway leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def copy_of(src: Path, d: Path, name: str) -> Path:
    shutil.copytree(src, d / name)
    return d / name


class Mounted(list):
    """argv run with a tmpfs mounted at `at` (read-only if asked) in a user and mount namespace of its
    own: a real read-only file system or mount point, seen by that process only and gone with it."""

    def __init__(self, argv: list[str], at: Path, read_only: bool = False) -> None:
        super().__init__(argv)
        at.mkdir()
        script = f'mount -t tmpfs {"-o ro " if read_only else ""}tmpfs "$0" && exec "$@"'
        self.prefix = ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(at))


@case
def c26_export_checkpoint_with_truncated_adapter(d, ctx):
    return export_checkpoint_cut_short(d, ctx.adapter, "adapter_model.safetensors")


@case
def c26_export_invalid_adapter_config(d, ctx):
    adapter = copy_of(ctx.adapter, d, "adapter")
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    return ["export", str(adapter), "--out", str(d / "exported")], ("adapter/adapter_config.json", "not valid JSON")


@case
def c27_export_checkpoint_with_truncated_shard(d, ctx):
    return export_checkpoint_cut_short(d, ctx.tiny, "model.safetensors")


@case
def c27_export_model_dir_with_truncated_shard(d, ctx):
    shard = cut_short(copy_of(ctx.tiny, d, "model") / "model.safetensors")
    return ["export", str(shard.parent), "--out", str(d / "exported")], (
        "model/model.safetensors", "not a whole safetensors file", "cut short")


@case
def c27_export_model_dir_with_cut_config(d, ctx):
    model = copy_of(ctx.tiny, d, "model")
    cut_short(model / "config.json")
    return ["export", str(model), "--out", str(d / "exported")], ("model", "could not read config.json", "not a valid JSON")


@case
def c28_export_out_on_read_only_file_system(d, ctx):
    return Mounted(["export", str(ctx.tiny), "--out", str(d / "ro" / "exported")], d / "ro", read_only=True), (
        "--out", "ro/exported", "read-only file system")


@case
def c28_export_out_is_a_mount_point(d, ctx):
    return Mounted(["export", str(ctx.tiny), "--out", str(d / "mnt")], d / "mnt"), ("--out", "mnt", "mount point")


@case
def c28_merge_out_on_read_only_file_system(d, ctx):
    argv = ["merge-adapter", "--base", str(ctx.tiny), "--adapter", str(ctx.adapter), "--out", str(d / "ro" / "m")]
    return Mounted(argv, d / "ro", read_only=True), ("--out", "ro/m", "read-only file system")


@case
def c28_merge_out_is_a_mount_point(d, ctx):
    argv = ["merge-adapter", "--base", str(ctx.tiny), "--adapter", str(ctx.adapter), "--out", str(d / "mnt")]
    return Mounted(argv, d / "mnt"), ("--out", "mnt", "mount point")


@case
def c29_merge_truncated_base(d, ctx):
    base = copy_of(ctx.tiny, d, "base")
    cut_short(base / "model.safetensors")
    argv = ["merge-adapter", "--base", str(base), "--adapter", str(ctx.adapter), "--out", str(d / "merged")]
    return argv, ("base/model.safetensors", "not a whole safetensors file")


@case
def c30_generate_adapter_whose_base_is_gone(d, ctx):
    adapter = copy_of(ctx.adapter, d, "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(d / "gone")}))
    return ["generate", str(adapter), "--prompt", "hi"], ("adapter_config.json", "base model", "gone", "does not exist")


@case
def c30_generate_config_without_weights(d, ctx):
    (d / "model").mkdir()
    shutil.copy(ctx.tiny / "config.json", d / "model")
    return ["generate", str(d / "model"), "--prompt", "hi"], ("model", "no model weights found")


def launch_with_config(d: Path, ctx: Ctx, text: str) -> list[str]:
    (d / "accelerate.yaml").write_text(text)
    return ["launch", train(d, ctx)[1], "--strategy", str(d / "accelerate.yaml"), "--num-processes", "2", "--dry-run"]


@case
def c31_launch_config_invalid_yaml(d, ctx):
    return launch_with_config(d, ctx, "distributed_type: [MULTI_GPU\n"), ("accelerate.yaml", "not a readable YAML", "line 2")


@case
def c31_launch_config_a_list(d, ctx):
    return launch_with_config(d, ctx, "- distributed_type: MULTI_GPU\n"), ("accelerate.yaml", "expected a mapping", "a list")


@case
def c31_launch_config_empty(d, ctx):
    return launch_with_config(d, ctx, ""), ("accelerate.yaml", "expected a mapping", "an empty file")


@case
def c32_flash_attention_without_gpu(d, ctx):
    return train(d, ctx) + ["--set", "model.attn_implementation=flash_attention_2"], (
        "recipe.yaml", "model.attn_implementation=flash_attention_2", "no GPU is visible")


# --- a hub that cannot be reached, for a user who has not set HF_HUB_OFFLINE: one line, no retries -----
def no_hub(d: Path) -> dict[str, str]:
    """A hub endpoint that refuses connections and an empty Hugging Face cache (beside the case dir)."""
    return {"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9",
            "HF_HOME": str(d.parent / "hf-home")}  # fmt: skip


NO_HUB = ("not a local path", "is not in the Hugging Face cache", "the hub cannot be used", "http://127.0.0.1:9")


@case
def c33_hub_model_unreachable(d, ctx):
    return data_check(d, ctx, [GOOD], model="nosuch-org/nosuch-model"), ("nosuch-org/nosuch-model", *NO_HUB), no_hub(d)


@case
def c33_hub_data_set_unreachable(d, ctx):
    argv = ["data", "--check", recipe(d, ctx.tiny, [{"path": "nosuch-org/nosuch-data"}])]
    return argv, ("nosuch-org/nosuch-data", "the data set", *NO_HUB), no_hub(d)


@case
def c33_plan_hub_model_unreachable(d, ctx):
    plan_recipe = recipe(d, "nosuch-org/nosuch-model", [{"path": "unused.jsonl"}])
    argv = ["plan", plan_recipe, "--gpus", "1", "--gpu-memory", "80GiB"]
    return argv, ("nosuch-org/nosuch-model", "its config.json", *NO_HUB), no_hub(d)


@case
def c33_train_before_the_model_is_built(d, ctx):
    """The README's `train recipes/demo.yaml` before `make-tiny-model models/tiny`: a relative path that reads
    as a hub id."""
    return train(d, ctx, model="models/not-built-yet"), ("models/not-built-yet", *NO_HUB), no_hub(d)


# --- round 3: what a third probe found ------------------------------------------------------------------
@case
def c35_export_out_is_a_symlink(d, ctx):
    (d / "target").mkdir()
    (d / "exported").symlink_to(d / "target")
    return ["export", str(ctx.tiny), "--out", str(d / "exported")], ("--out", "exported", "symbolic link", "target")


@case
def c35_export_shard_shape_disagrees_with_config(d, ctx):
    from safetensors.torch import load_file, save_file

    model = copy_of(ctx.tiny, d, "model")
    state = load_file(model / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"][:64].clone()
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    return ["export", str(model), "--out", str(d / "exported")], (
        "model", "model.layers.0.self_attn.q_proj.weight", "(64, 128)", "config.json gives (128, 128)")


@case
def c35_generate_adapter_of_another_shape(d, ctx):
    adapter = copy_of(ctx.adapter, d, "adapter")
    base = ctx.narrow_llama(d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ctx.tiny / name, base / name)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    return ["generate", str(adapter), "--prompt", "hi"], (
        "adapter/adapter_model.safetensors", "lora_A", "[4, 128]", "needs [4, 64]", "base_model_name_or_path")


@case
def c35_train_model_dir_with_truncated_weights(d, ctx):
    model = copy_of(ctx.tiny, d, "model")
    cut_short(model / "model.safetensors")
    return train(d, ctx, model=model), ("model/model.safetensors", "not a whole safetensors file")


@case
def c35_train_model_dir_without_weights(d, ctx):
    model = copy_of(ctx.tiny, d, "model")
    (model / "model.safetensors").unlink()
    return train(d, ctx, model=model), ("model", "no model weights found")


LONE_SURROGATE = '{"instruction": "Say \\ud83d\\ude00 hi.", "context": "", "response": "Hi \\ud800 there."}'


@case
def c35_jsonl_lone_surrogate_escape(d, ctx):
    return data_check(d, ctx, [GOOD, LONE_SURROGATE]), ("data.jsonl line 2", "lone surrogate")


@case
def c35_json_lone_surrogate_escape(d, ctx):
    (d / "data.json").write_text(f"[{json.dumps(GOOD)}, {LONE_SURROGATE}]")
    return data_check(d, ctx, name="data.json"), ("data.json row 2", "lone surrogate")


@case
def c35_launch_huge_global_batch(d, ctx):
    """1e12 does not divide over 3 processes: the working counts are listed up to a bound, not searched to 1e12."""
    argv = ["launch", train(d, ctx, global_batch_size=10**12)[1], "--strategy", "ddp", "--num-processes", "3", "--dry-run"]
    return argv, ("recipe.yaml", "global_batch_size 1000000000000", "1, 2, 4, 5, 8", "1000, ...; got 3")


@case
def c35_finished_run_file_edited_by_hand(d, ctx):
    from sftdist.checkpoint import recipe_yaml
    from sftdist.recipe import load_recipe

    argv = train(d, ctx)
    run = d / "run"
    (run / "final").mkdir(parents=True)
    (run / "sftdist_recipe.yaml").write_text(recipe_yaml(load_recipe(argv[1])))
    (run / "sftdist_run.json").write_text('{"distributed": "edited"')
    return argv, ("run/sftdist_run.json", "not the run file sftdist wrote", "--no-resume")


@case
def c35_template_refusal_names_the_recipes_chat_template(d, ctx):
    rows = [{"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4", "reasoning_content": "add them"}]}]
    return data_check(d, ctx, rows, data={"chat_template": "chatml"}), (
        "data.jsonl line 1", "data.chat_template chatml does not render reasoning", "another that does")


# --- selftest: its command line, --out, --work and --size checked before anything is written ---------------
@case
def c35_selftest_num_processes_under_single(d, ctx):
    return ["selftest", "--num-processes", "2"], ("--num-processes 2", "--strategy single", "--strategy ddp")


@case
def c35_selftest_peak_tflops_nan(d, ctx):
    return ["selftest", "--peak-tflops", "nan"], ("--peak-tflops nan", "finite number")


@case
def c35_selftest_out_on_read_only_file_system(d, ctx):
    argv = ["selftest", "--steps", "2", "--out", str(d / "ro" / "reports" / "r.json")]
    return Mounted(argv, d / "ro", read_only=True), ("--out", "ro/reports/r.json", "read-only file system")


@case
def c35_selftest_config_with_invalid_fields(d, ctx):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 0}  # fmt: skip
    (d / "cfg").mkdir()
    (d / "cfg" / "config.json").write_text(json.dumps(config))
    return ["selftest", "--size", str(d / "cfg" / "config.json")], ("config cfg-", "not a config transformers knows")


@case
def c35_selftest_work_with_truncated_weights(d, ctx):
    shutil.copytree(ctx.tiny, d / "work" / "models" / "tiny")
    cut_short(d / "work" / "models" / "tiny" / "model.safetensors")
    return ["selftest", "--work", str(d / "work")], (
        "--work", "models/tiny/model.safetensors", "not a whole safetensors file", "selftest writes it again")


# --- a run that succeeds with dropped rows: one warning line per source, with counts -----------------
def dropped_rows_run(d: Path, ctx: Ctx) -> list[str]:
    empty = jsonl(d / "some-empty.jsonl", [GOOD, {**GOOD, "response": ""}, GOOD, {**GOOD, "response": " "}, {**GOOD, "response": ""}])
    long = jsonl(d / "some-long.jsonl", [GOOD, LONG, GOOD])
    return ["data", "--check", recipe(d, ctx.tiny, [{"path": str(empty)}, {"path": str(long)}], data={"max_length": 32})]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root, with the bytes of files (None for directories)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def results(request, tmp_path_factory, tiny_model) -> dict[str, tuple[Any, dict, dict]]:
    """Build the selected cases, run their CLIs three at a time, and snapshot each case dir around it."""
    wanted = {item.callspec.params["name"] for item in request.session.items
              if getattr(item, "module", None) is request.module and hasattr(item, "callspec")}
    root = tmp_path_factory.mktemp("errors")
    ctx = Ctx(tiny_model, root)
    jobs = {}
    for name in sorted(wanted):
        d = root / name / "case"
        d.mkdir(parents=True)
        argv, words, *env = CASES[name](d, ctx) if name in CASES else (dropped_rows_run(d, ctx), ())
        jobs[name] = (d, argv, words, snapshot(d), env[0] if env else None)

    def run(name: str) -> subprocess.CompletedProcess:
        _, argv, _, _, env = jobs[name]
        # Mounted cases run in their namespace.
        return run_cli(*argv, env=env, timeout=300, prefix=getattr(argv, "prefix", ()))

    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = dict(zip(jobs, pool.map(run, jobs)))
    return {name: (procs[name], words, before, snapshot(d)) for name, (d, _, words, before, _) in jobs.items()}


def message_lines(stderr: str) -> list[str]:
    """Every line on stderr: the libraries' own warnings and progress bars are silenced (sftdist/quiet.py)."""
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_error(results, name):
    proc, words, before, after = results[name]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = message_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert after == before, "the failed command wrote, created or removed files"


@pytest.mark.parametrize("name", ["dropped_rows"])
def test_dropped_rows_warn_once_per_source_with_counts(results, name):
    proc, _, before, after = results[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok: 2 sources, 4 samples pass every check"
    lines = message_lines(proc.stderr)
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("warning: dropped 3 of 5 rows of ") and "some-empty.jsonl" in lines[0]
    assert lines[0].endswith(": 3 empty response"), lines[0]
    assert lines[1].startswith("warning: dropped 1 of 3 rows of ") and "some-long.jsonl" in lines[1]
    assert lines[1].endswith(": 1 longer than max_length 32"), lines[1]
    assert after == before


def test_ctrl_c_leaves_only_complete_checkpoints(tmp_path, tiny_model):
    """SIGINT mid-run: save at the next step boundary, exit 75, every checkpoint marked, no final/."""
    src = REPO / "sftdist" / "demo" / "train.jsonl"
    r = recipe(tmp_path, tiny_model, [{"path": str(src), "limit": 200}],
               train={"max_steps": 500, "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 2})
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftdist", "train", r],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    signal_at_first_loss(proc, signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == EXIT_PREEMPTED, rest[-3000:]
    assert "Traceback" not in rest and "run the same command again to resume" in rest
    run = tmp_path / "run"
    ckpts = list(run.glob("checkpoint-*"))
    assert ckpts and all((c / COMPLETE_MARKER).is_file() for c in ckpts)
    assert not (run / "final").exists() and not (run / "final.partial").exists()
    assert not list(run.rglob(".*.tmp"))
