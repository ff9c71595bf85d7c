"""The recipe schema: defaults, --set overrides, type checks, unknown keys with a suggestion, choices,
and the file-level errors, each naming the recipe file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sftdist.errors import UserError
from sftdist.recipe import Recipe, load_recipe, recipe_from_dict, typed_train

MINIMAL = {"model": {"name_or_path": "some/model"}, "data": {"train": [{"path": "d.jsonl"}]}}


def write(tmp_path: Path, raw: object, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw), encoding="utf-8")
    return path


def error(tmp_path: Path, raw: object, *overrides: str) -> str:
    with pytest.raises(UserError) as e:
        load_recipe(write(tmp_path, raw), overrides)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(tmp_path / "recipe.yaml")), msg
    return msg


def with_(**changes: dict) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for section, values in changes.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return raw


def test_defaults_are_safe(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.method == "full"
    assert r.model.trust_remote_code is False
    assert (r.data.max_length, r.data.packing, r.data.loss_on, r.data.truncate) == (1024, True, "completion", False)
    assert r.data.train[0].path == "d.jsonl" and r.data.train[0].format == "auto"
    assert r.source == str(tmp_path / "recipe.yaml")


def test_overrides_parse_yaml_scalars_and_create_keys(tmp_path):
    r = load_recipe(
        write(tmp_path, MINIMAL),
        ["train.max_steps=50", "data.packing=false", "lora.dropout=1e-1", "method=lora", "train.report_to=[]"],
    )
    assert r.train == {"max_steps": 50, "report_to": []}
    assert r.data.packing is False
    assert r.lora.dropout == 0.1
    assert r.method == "lora"


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path):
    # PyYAML reads 5e-2 (no dot) as a string; float fields accept it.
    r = load_recipe(write(tmp_path, "model: {name_or_path: m}\ndata: {train: [{path: d}], eval_fraction: 5e-2}\n"))
    assert r.data.eval_fraction == 0.05


def test_to_dict_round_trips():
    r = recipe_from_dict(with_(method="lora", lora={"r": 4, "target_modules": ["q_proj"]}), source="x")
    again = recipe_from_dict(r.to_dict(), source="x")
    assert again == r and isinstance(again, Recipe)


@pytest.mark.parametrize(
    "raw, words",
    [
        (with_(data={"max_lenght": 64}), ["unknown recipe key 'data.max_lenght'", "did you mean 'max_length'?"]),
        (with_(model={"name_or_path": "m", "trust_remote": True}), ["'model.trust_remote'", "'trust_remote_code'"]),
        (with_(data={"train": [{"path": "d", "wieght": 2}]}), ["'data.train[0].wieght'", "did you mean 'weight'?"]),
        (with_(learning_rate=1e-3), ["'learning_rate'", "valid keys: data, eval_tasks, global_batch_size, lora, max_shard_size, method, model"]),
    ],
    ids=["nested", "model", "source", "top-level"],
)
def test_unknown_keys_suggest_the_nearest(tmp_path, raw, words):
    msg = error(tmp_path, raw)
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize(
    "raw, words",
    [
        (with_(data={"max_length": "long"}), ["data.max_length", "'long'", "expected an integer"]),
        (with_(data={"max_length": 64.5}), ["data.max_length", "64.5", "expected an integer"]),
        (with_(data={"packing": 1}), ["data.packing", "got 1", "expected true or false"]),
        (with_(lora={"dropout": "high"}), ["lora.dropout", "'high'", "expected a number"]),
        (with_(lora={"target_modules": 5}), ["lora.target_modules", "got 5", "expected a string or a list of strings"]),
        (with_(data={"train": "d.jsonl"}), ["data.train", "'d.jsonl'", "expected a list"]),
        (with_(data={"train": [{"path": "d", "limit": "all"}]}), ["data.train[0].limit", "'all'", "expected an integer or null"]),
        (with_(train="fast"), ["train", "'fast'", "expected a mapping"]),
        (with_(model="gpt2"), ["model", "'gpt2'", "expected a mapping of keys"]),
    ],
    ids=["int", "int-not-float", "bool", "float", "union", "list", "optional", "dict", "section"],
)
def test_wrong_types_say_what_was_expected(tmp_path, raw, words):
    msg = error(tmp_path, raw)
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize(
    "raw, words",
    [
        (with_(method="dpo"), ["method: 'dpo' is not valid", "full, lora, qlora"]),
        (with_(model={"name_or_path": "m", "dtype": "fp16"}), ["model.dtype", "auto, bfloat16, float16, float32"]),
        (with_(data={"loss_on": "prompt"}), ["data.loss_on", "completion, all"]),
        (with_(data={"train": [{"path": "d", "format": "chatml"}]}), ["data.train[0].format", "auto, text"]),
        (with_(data={"template": "vicuna"}), ["data.template", "default, alpaca"]),
        (with_(data={"chat_template": "llama9"}), ["data.chat_template", "auto, chatml, cohere,", "qwen3,", "a path ending in .jinja"]),
        (with_(quantization={"quant_type": "int4"}), ["quantization.quant_type", "nf4, fp4"]),
        (with_(quantization={"storage_dtype": "int8"}), ["quantization.storage_dtype", "uint8"]),
    ],
    ids=["method", "dtype", "loss_on", "format", "template", "chat_template", "quant_type", "storage"],
)
def test_unknown_choices_list_the_valid_ones(tmp_path, raw, words):
    msg = error(tmp_path, raw)
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"data": {"train": [{"path": "d"}]}}, ["model.name_or_path is required"]),
        ({"model": {"name_or_path": "m"}}, ["data.train is empty"]),
        (with_(data={"train": [{"format": "dolly"}]}), ["data.train[0].path is required"]),
        (with_(data={"eval": [{"path": ""}]}), ["data.eval[0].path is required"]),
        (with_(data={"train": [{"path": "d", "weight": 0}]}), ["data.train[0].weight is 0.0", "positive"]),
        (with_(data={"eval_fraction": 1.0}), ["data.eval_fraction is 1.0", "0 <= x < 1"]),
        (with_(data={"max_length": 4}), ["data.max_length is 4", "at least 8"]),
    ],
    ids=["model", "train", "path", "eval-path", "weight", "eval_fraction", "max_length"],
)
def test_missing_and_out_of_range_values(tmp_path, raw, words):
    msg = error(tmp_path, raw)
    for w in words:
        assert w in msg, msg


def test_bad_set_overrides(tmp_path):
    assert "expected KEY=VALUE" in error(tmp_path, MINIMAL, "train.max_steps")
    assert "unknown recipe key 'data.paking'" in error(tmp_path, MINIMAL, "data.paking=false")
    assert "data.max_length: got 'big'" in error(tmp_path, MINIMAL, "data.max_length=big")


def test_file_level_errors(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    assert "line 3 is not valid YAML (mapping values" in error(tmp_path, "model:\n  name_or_path: m\ndata: train: x\n")
    assert "expected a mapping of recipe keys at the top level, got list" in error(tmp_path, "- a\n- b\n")
    assert "model.name_or_path is required" in error(tmp_path, "")
    (tmp_path / "recipe.yaml").write_bytes(b"model: {name_or_path: caf\xe9}\n")
    with pytest.raises(UserError, match="not UTF-8"):
        load_recipe(tmp_path / "recipe.yaml")


def test_train_keys_are_checked_against_sftconfig(tmp_path):
    def check(train: dict) -> dict:
        r = load_recipe(write(tmp_path, with_(train=train)))
        typed = typed_train(r)
        assert r.train == train  # the recipe itself is left as written
        return typed

    assert check({"learning_rate": "2e-5", "max_steps": 3}) == {"learning_rate": 2e-5, "max_steps": 3}
    src = str(tmp_path / "recipe.yaml")
    for train, words in [
        ({"learning_rat": 1e-3}, [src, "unknown recipe key 'train.learning_rat'", "did you mean 'learning_rate'?"]),
        ({"learning_rate": "fast"}, [src, "train.learning_rate: got 'fast'", "expected a number"]),
        ({"max_length": 64}, [src, "train.max_length is set by sftdist", "'data.max_length'"]),
        ({"output_dir": "x"}, [src, "train.output_dir is set by sftdist", "'output_dir'"]),
    ]:
        with pytest.raises(UserError) as e:
            check(train)
        for w in words:
            assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")))
def test_shipped_recipes_load_and_their_train_keys_are_valid(path):
    from sftdist.recipe import load_recipe, typed_train

    recipe = load_recipe(path)
    typed_train(recipe)
    assert recipe.output_dir.startswith("runs/")


@pytest.mark.parametrize(
    "text, words",
    [
        ("- model\n- data\n", ["expected a mapping of recipe keys at the top level, got list"]),
        ("'just a string'\n", ["expected a mapping of recipe keys at the top level, got str"]),
        ("model: {name_or_path: m}\n1: x\n", ["line 2", "key 1 is not a string"]),
        ("model: {name_or_path: m}\ntrain: {true: 3}\n", ["line 2", "key True is not a string"]),
        ("model: {name_or_path: m}\ndata: {train: [{path: d}]}\ntrain: {max_steps: 5, max_steps: 50}\n",
         ["line 3", "key 'max_steps' appears twice"]),
        ("model: {name_or_path: a}\nmodel: {name_or_path: b}\n", ["line 2", "key 'model' appears twice"]),
        ("model: {name_or_path: m}\ndata: 5\n", ["data: expected a mapping of keys, got 5"]),
        ("model: {name_or_path: m}\ndata: {train: [5]}\n", ["data.train[0]: expected a mapping of keys, got 5"]),
        ("model: {name_or_path: m}\nlora: [8]\n", ["lora: expected a mapping of keys, got [8]"]),
    ],
    ids=["list", "scalar", "int-key", "bool-key", "duplicate-nested", "duplicate-top", "section-scalar",
         "source-scalar", "section-list"],
)
def test_yaml_that_is_not_a_plain_mapping_of_known_keys(tmp_path, text, words):
    msg = error(tmp_path, text)
    for w in words:
        assert w in msg, msg


def test_set_into_a_list_or_scalar_names_the_key(tmp_path):
    msg = error(tmp_path, MINIMAL, "data.train.0.path=x.jsonl")
    assert "--set 'data.train.0.path=x.jsonl'" in msg and "'data.train' is [" in msg and "not a mapping" in msg
    assert "'method' is 'full', not a mapping" in error(tmp_path, with_(method="full"), "method.r=4")
    # An empty section (`lora:` with nothing under it) takes keys.
    assert load_recipe(write(tmp_path, with_(lora=None)), ["lora.r=4"]).lora.r == 4


@pytest.mark.parametrize("text", ["1.5GB", "500mb", "0MB", "-1GB", "5 gigs", "GB"])
def test_shard_sizes_that_save_pretrained_would_misread_are_refused(text):
    from sftdist.preflight import check_shard_size

    with pytest.raises(UserError, match=r"max_shard_size .*expected a whole number and a unit"):
        check_shard_size(text, "max_shard_size")


def test_shard_sizes_read_as_save_pretrained_reads_them():
    from sftdist.preflight import check_shard_size

    assert [check_shard_size(t, "x") for t in ("500MB", "5GB", "2GiB")] == [500 * 10**6, 5 * 10**9, 2 << 30]


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"train": {"learning_rate": -1}}, ["train.learning_rate is -1", "positive"]),
        ({"train": {"learning_rate": "0"}}, ["train.learning_rate is 0.0", "positive"]),
        ({"method": "lora", "lora": {"r": 0}}, ["lora.r is 0", "positive integer"]),
        ({"method": "qlora", "lora": {"dropout": 1.0}}, ["lora.dropout is 1.0", "0 <= x < 1"]),
        ({"method": "lora", "lora": {"target_modules": []}}, ["lora.target_modules is empty"]),
        ({"max_shard_size": "2.5GB"}, ["max_shard_size '2.5GB'"]),
    ],
    ids=["lr-negative", "lr-zero-string", "rank", "dropout", "no-targets", "shard"],
)
def test_preflight_values(tmp_path, changes, words):
    from sftdist.preflight import check_values

    r = load_recipe(write(tmp_path, with_(**changes)))
    with pytest.raises(UserError) as e:
        check_values(r)
    for w in [str(tmp_path / "recipe.yaml"), *words]:
        assert w in str(e.value), str(e.value)
