"""Safe defaults, each shown with an input that would run code if the default were not there: a model
directory with its own Python code, pickle weights that act when unpickled, YAML with a python tag,
and no shell anywhere in the package."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import yaml

from conftest import REPO, run_cli

GOOD = {"instruction": "Say hi.", "context": "", "response": "Hi."}


def recipe(tmp_path: Path, model: Path | str, **model_keys) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    raw = {
        "model": {"name_or_path": str(model), **model_keys},
        "data": {"train": [{"path": str(data)}], "max_length": 64},
        "train": {"max_steps": 1, "report_to": []},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def remote_code_model(tiny: Path, tmp_path: Path, marker: Path) -> Path:
    """The tiny model relabelled as a custom architecture whose code (evil.py) writes `marker` on import."""
    model = tmp_path / "custom-model"
    shutil.copytree(tiny, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "evil_model"
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok))
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return model


def test_model_code_is_not_run_unless_the_recipe_trusts_it(tmp_path, tiny_model):
    marker = tmp_path / "code-ran"
    model = remote_code_model(tiny_model, tmp_path, marker)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}  # where transformers copies trusted code

    line = one_error_line(run_cli("train", str(recipe(tmp_path, model)), env=env))
    assert "custom-model" in line and "own Python code" in line and "model.trust_remote_code: true" in line
    assert not marker.exists()
    assert not (tmp_path / "run").exists()

    # The flag is what lets it run: the same directory with trust_remote_code set imports evil.py.
    run_cli("data", "--check", str(recipe(tmp_path, model, trust_remote_code=True)), env=env)
    assert marker.read_text() == "ran"


class _Touch:
    """Unpickling this creates a file: what a hostile .bin could do with any callable."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_weights_are_refused(tmp_path, tiny_model):
    import torch

    marker = tmp_path / "unpickled"
    model = tmp_path / "bin-model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"model.embed_tokens.weight": _Touch(marker)}, model / "pytorch_model.bin")

    line = one_error_line(run_cli("train", str(recipe(tmp_path, model))))
    assert "bin-model" in line and "pickle" in line and "safetensors" in line
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_generate_refuses_pickle_weights(tmp_path, tiny_model):
    import torch

    marker = tmp_path / "unpickled"
    model = tmp_path / "bin-model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"model.embed_tokens.weight": _Touch(marker)}, model / "pytorch_model.bin")

    line = one_error_line(run_cli("generate", str(model), "--prompt", "Hi", "--max-new-tokens", "2"))
    assert "bin-model" in line and "pickle" in line
    assert not marker.exists()


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "yaml-ran"
    r = tmp_path / "recipe.yaml"
    r.write_text(f'model:\n  name_or_path: !!python/object/apply:os.system ["touch {marker}"]\n')
    line = one_error_line(run_cli("train", str(r)))
    assert "recipe.yaml" in line and "line 2" in line and "not valid YAML" in line

    r.write_text(f'!!python/object/apply:os.system ["touch {marker}"]\n')
    assert "not valid YAML" in one_error_line(run_cli("data", "--check", str(r)))

    # --set values are parsed as YAML scalars too: a tag stays an inert string.
    r.write_text(yaml.safe_dump({"data": {"train": [{"path": "x.jsonl"}]}}))
    line = one_error_line(run_cli("data", "--check", str(r), "--set", f"model.name_or_path=!!python/object/apply:os.system [touch {marker}]"))
    assert "model path does not exist" in line
    assert not marker.exists()


def test_a_saved_recipe_with_a_python_tag_is_not_executed(tmp_path, tiny_model):
    """output_dir/sftdist_recipe.yaml is read back to decide on resume: it is input like any other."""
    marker = tmp_path / "saved-ran"
    run = tmp_path / "run"
    run.mkdir()
    saved = run / "sftdist_recipe.yaml"
    saved.write_text(f'!!python/object/apply:os.system ["touch {marker}"]\n')
    before = saved.read_bytes()
    line = one_error_line(run_cli("train", str(recipe(tmp_path, tiny_model))))
    assert "sftdist_recipe.yaml" in line
    assert not marker.exists()
    assert [p.name for p in run.iterdir()] == ["sftdist_recipe.yaml"] and saved.read_bytes() == before


def test_no_shell_anywhere_in_the_package():
    """No shell=True, os.system, os.popen or subprocess.getoutput: user strings never reach a shell."""
    found = []
    for path in sorted((REPO / "sftdist").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{where} shell=")
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in ("system", "popen", "getoutput", "getstatusoutput"):
                found.append(f"{where} {f.attr}()")
    assert found == []
    assert "shell=True" not in "".join(p.read_text() for p in (REPO / "sftdist").rglob("*.py"))
