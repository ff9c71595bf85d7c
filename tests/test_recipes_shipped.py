"""The recipes shipped inside the package: each plans offline with the `plan` line of its own header,
real-model recipes keep their global batch at any world size and name a chat template their tokenizer
has (checked against the published tokenizer facts shipped beside the config.json), and `sftdist
recipes` lists and copies them, also from a non-editable install."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from sftdist.hub import SHIPPED_CONFIGS, shipped_config
from sftdist.shipped_recipes import RECIPES_DIR, shipped

RECIPES = sorted(shipped())
# Recipes of published models (whose config.json ships); the others name a local model (demo, test fixture).
REAL = [n for n in RECIPES if shipped_config(yaml.safe_load((RECIPES_DIR / f"{n}.yaml").read_text())["model"]["name_or_path"])]
CHAT = [n for n in REAL if {s.get("format", "auto") for s in yaml.safe_load((RECIPES_DIR / f"{n}.yaml").read_text())["data"]["train"]}
        & {"messages", "sharegpt", "auto"}]
CONVERSATION = [
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "And an even one?"},
    {"role": "assistant", "content": "Two."},
]


def header_command(name: str, command: str) -> list[str]:
    """The `sftdist COMMAND ...` line of a recipe's comment header, as argv after `sftdist`."""
    for line in (RECIPES_DIR / f"{name}.yaml").read_text().splitlines():
        m = re.match(rf"#\s+sftdist {command} (.*)", line)
        if m:
            return [command, *shlex.split(m.group(1))]
    raise AssertionError(f"{name}.yaml: no `sftdist {command}` line in its header")


def test_top_level_recipes_is_the_package_folder() -> None:
    """One copy of each recipe: the clone's recipes/ (the README's paths) is the packaged folder."""
    assert (REPO / "recipes").resolve() == RECIPES_DIR.resolve()
    assert len(CHAT) == 4 and "llama3-8b-qlora" in REAL and "llama3-8b-qlora" not in CHAT
    assert {"demo", "qwen3-8b-chat-qlora-8gpu", "llama3.1-8b-instruct-lora", "mistral-7b-chat-full-zero3",
            "qwen3-0.6b-chat-1gpu"} <= set(RECIPES)


@pytest.mark.parametrize("name", REAL)
def test_real_model_recipe_plans_offline_as_its_header_says(name: str) -> None:
    """The header's `sftdist plan` line, offline (nothing cached: the shipped config.json answers), recommends
    a strategy, and the strategy of the header's `launch` line fits by that plan."""
    from sftdist.plan import make_plan
    from sftdist.recipe import load_recipe
    from sftdist.units import parse_size

    argv = header_command(name, "plan")
    assert argv[1] == f"recipes/{name}.yaml"
    opts = dict(zip(argv[2::2], argv[3::2]))
    recipe = load_recipe(RECIPES_DIR / f"{name}.yaml")
    assert (SHIPPED_CONFIGS / recipe.model.name_or_path / "config.json").is_file()
    plan = make_plan(recipe, int(opts["--num-processes"]), parse_size(opts["--gpu-memory"], "--gpu-memory"))
    assert plan.recommended is not None, name
    if opts["--num-processes"] == "1":  # one GPU: the header trains in one process
        assert header_command(name, "train")[1] == f"recipes/{name}.yaml"
        strategy = "single"
    else:
        launch = header_command(name, "launch")
        strategy = launch[launch.index("--strategy") + 1]
        assert launch[launch.index("--num-processes") + 1] == opts["--num-processes"]
    assert plan.status(next(e for e in plan.estimates if e.strategy == strategy)) in ("fits", "tight")


def test_local_recipes_plan(tiny_model: Path) -> None:
    """The demo and fixture recipes plan too (the demo's model is the one `make demo` builds)."""
    from sftdist.plan import make_plan
    from sftdist.recipe import load_recipe

    for name in set(RECIPES) - set(REAL):
        recipe = load_recipe(RECIPES_DIR / f"{name}.yaml", [f"model.name_or_path={tiny_model}"] if name == "demo" else [])
        assert make_plan(recipe, 1, 24 * 2**30).recommended is not None, name


def _render(template: str, facts: dict, messages: list[dict]) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    return render_jinja_template([messages], chat_template=template, bos_token=facts.get("bos_token") or "",
                                 eos_token=facts["eos_token"])[0][0]


@pytest.mark.parametrize("name", REAL)
def test_real_model_recipe_sets_global_batch_and_a_template_its_tokenizer_has(name: str) -> None:
    """global_batch_size is set (the run trains the same at any number of GPUs); for chat data, the
    template the recipe names is the tokenizer's (by the published tokenizer_config.json shipped beside the
    config), and the template training uses ends every assistant turn with the tokenizer's EOS and renders
    a conversation's prefixes as prefixes of it (what locating the assistant tokens needs)."""
    from trl import chat_template_utils as ctu

    from sftdist.data.templates import CHAT_TEMPLATES, training_families, training_template
    from sftdist.recipe import load_recipe

    recipe = load_recipe(RECIPES_DIR / f"{name}.yaml")
    assert recipe.global_batch_size is not None and "gradient_accumulation_steps" not in recipe.train
    assert recipe.train_setting("activation_checkpointing") is True
    if name not in CHAT:
        return  # instruction rows: a prompt template, no chat template involved
    facts = json.loads((SHIPPED_CONFIGS / recipe.model.name_or_path / "tokenizer_config.json").read_text())
    setting = recipe.data.chat_template
    if setting in training_families():
        assert facts["chat_template"] == getattr(ctu, f"{setting}_chat_template"), "not this tokenizer's family"
        used = training_template(setting)
    elif setting == "auto":
        used = facts["chat_template"]
    else:
        assert setting in CHAT_TEMPLATES, setting  # chatml: plain text, any tokenizer with an EOS
        used = CHAT_TEMPLATES[setting]
    full = _render(used, facts, CONVERSATION)
    assert _render(used, facts, CONVERSATION[:2]) in full and full.startswith(_render(used, facts, CONVERSATION[:2]))
    for turn in ("Seven.", "Two."):
        assert re.search(re.escape(turn) + r"\s*" + re.escape(facts["eos_token"]), full), (turn, full)


def test_recipes_list_and_copy(tmp_path: Path) -> None:
    """`sftdist recipes` lists every shipped recipe with its summary; `recipes copy` writes the same bytes,
    into a directory or to a file name; an unknown name or an existing file is one line, exit 2, nothing written."""
    listed = run_cli("recipes")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert names == RECIPES
    assert "QLoRA of Qwen3-8B" in listed.stdout

    src = RECIPES_DIR / "qwen3-8b-chat-qlora-8gpu.yaml"
    into_dir = run_cli("recipes", "copy", "qwen3-8b-chat-qlora-8gpu", str(tmp_path))
    assert into_dir.returncode == 0, into_dir.stderr
    assert (tmp_path / src.name).read_bytes() == src.read_bytes()
    as_file = run_cli("recipes", "copy", "demo.yaml", str(tmp_path / "mine.yaml"))
    assert as_file.returncode == 0 and (tmp_path / "mine.yaml").read_bytes() == (RECIPES_DIR / "demo.yaml").read_bytes()

    before = sorted(p.name for p in tmp_path.iterdir())
    bad = run_cli("recipes", "copy", "qwen3-8b-qlora", str(tmp_path))
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: no shipped recipe 'qwen3-8b-qlora'; did you mean")
    again = run_cli("recipes", "copy", "demo", str(tmp_path / "mine.yaml"))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "mine.yaml").read_bytes() == (RECIPES_DIR / "demo.yaml").read_bytes()


def test_wheel_ships_recipes_and_published_facts(tmp_path: Path) -> None:
    """A non-editable install gets every recipe and every published config/tokenizer fact (package data)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "sftdist", src / "sftdist", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True,
                         env={**os.environ, "PIP_NO_INDEX": "1"})
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("sftdist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in RECIPES:
        assert f"sftdist/recipes/{name}.yaml" in names
    for path in SHIPPED_CONFIGS.rglob("*.json"):
        assert f"sftdist/{path.relative_to(REPO / 'sftdist').as_posix()}" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith("LICENSE") for n in names)


@pytest.mark.parametrize("name", CHAT)
def test_chat_recipe_trains_the_assistant_turns_with_its_tokenizer_facts(name: str, tiny_model: Path) -> None:
    """sftdist's own chat encoding, on a tokenizer given the published facts (special tokens, BOS/EOS, chat
    template) and the recipe's `data.chat_template`: the loss covers each assistant answer and the EOS after
    it, and nothing the user wrote."""
    from transformers import AutoTokenizer

    from sftdist.data.chat import encode_chat, set_chat_template
    from sftdist.data.formats import Example
    from sftdist.recipe import load_recipe

    recipe = load_recipe(RECIPES_DIR / f"{name}.yaml")
    facts = json.loads((SHIPPED_CONFIGS / recipe.model.name_or_path / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tokens = {v for k, v in facts.items() if k.endswith("_token") and v}
    tokens |= set(re.findall(r"<\|[a-z_]+\|>", facts.get("chat_template") or ""))
    tok.add_special_tokens({"additional_special_tokens": sorted(tokens)})
    tok.eos_token, tok.bos_token = facts["eos_token"], facts.get("bos_token")
    tok.chat_template = facts.get("chat_template")
    set_chat_template(tok, recipe.data.chat_template, name)
    ids, mask = encode_chat(tok, Example(kind="chat", messages=CONVERSATION, loss=[False, True, False, True]),
                            {tok.eos_token_id}, name)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    eos = re.escape(facts["eos_token"])
    assert re.fullmatch(rf"(?:\s|<think>\s*</think>)*Seven\.{eos}(?:\s|<think>\s*</think>)*Two\.{eos}\s*", trained), trained
