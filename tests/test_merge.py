"""`sftdist merge-adapter`: merged weights equal peft's merge, greedy text equal, QLoRA merged into
the 4-bit weights, sharded streaming, the model card, and the refusals (exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import GPT2_TINY, REPO, run_cli

from sftdist.merge import merge_adapter

LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
PROMPT = torch.tensor([[5, 17, 3, 99, 42, 7]])


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _make_llama(path: Path, shard: str = "64KB", seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides})).save_pretrained(path, max_shard_size=shard)
    return path


def _make_adapter(model, out: Path, seed: int = 1, **lora) -> Path:
    """A peft adapter with non-zero deltas (B is zero at init), saved as training would."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora}))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "magnitude" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(out)
    return out


def _peft(base: Path, adapter: Path, vocab: int | None = None, **load):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **load)
    if vocab:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return PeftModel.from_pretrained(model, adapter).eval()


def _assert_matches_peft_merge(out: Path, base: Path, adapter: Path, vocab: int | None = None, atol: float = 1e-5):
    theirs = _peft(base, adapter, vocab).merge_and_unload().state_dict()
    ours = _tensors(out)
    assert set(_tensors(base)) <= set(ours)
    for name, t in ours.items():
        assert torch.allclose(t.float(), theirs[name].float(), atol=atol), name


def _greedy(model, ids: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0].tolist()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (hidden 64: bitsandbytes' CPU 4-bit kernels need rows of >= 64) in several shards."""
    return _make_llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="module")
def lora(llama: Path) -> Path:
    from transformers import AutoModelForCausalLM

    return _make_adapter(AutoModelForCausalLM.from_pretrained(llama), llama.parent / "lora")


def test_cli_merge_of_sharded_base_matches_peft_and_generates_the_same(llama: Path, lora: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    n_shards = len(list(llama.glob("*.safetensors")))
    assert n_shards >= 4
    out = tmp_path / "merged"
    r = run_cli("merge-adapter", "--base", str(llama), "--adapter", str(lora), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "verification passed" in r.stdout and "tolerance" in r.stdout
    assert f"shard {n_shards}/{n_shards}" in r.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == n_shards
    assert set(index["weight_map"]) == set(_tensors(llama))
    _assert_matches_peft_merge(out, llama, lora)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert _greedy(merged, PROMPT) == _greedy(_peft(llama, lora), PROMPT)
    card = (out / "README.md").read_text()
    assert str(llama) in card and "lora: merged into the base weights" in card and "verification: passed" in card
    assert not list(tmp_path.glob(".merged*"))


def test_reshard_and_dtype(llama: Path, lora: Path, tmp_path: Path):
    out = tmp_path / "merged"
    result = merge_adapter(str(llama), str(lora), str(out), dtype="bfloat16", max_shard_size="40KB", verify=False)
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == len(result.files) >= 4
    for f in files:  # every shard respects the limit unless it holds one oversized tensor
        from safetensors import safe_open

        with safe_open(f, "pt") as st:
            assert f.stat().st_size <= 40_000 + 2048 or len(st.keys()) == 1
    ours = _tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    theirs = _peft(llama, lora).merge_and_unload().state_dict()
    for name, t in ours.items():
        assert torch.allclose(t.float(), theirs[name], rtol=4e-3, atol=1e-6), name  # bf16 rounds by <= 2**-9


def test_rslora_with_rank_and_alpha_patterns(llama: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    adapter = _make_adapter(
        AutoModelForCausalLM.from_pretrained(llama), tmp_path / "rs", use_rslora=True,
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"v_proj": 3},
    )
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["rank_pattern"]
    out = tmp_path / "merged"
    result = merge_adapter(str(llama), str(adapter), str(out))
    assert result.verification.startswith("passed")
    _assert_matches_peft_merge(out, llama, adapter)


def test_dora_with_resized_vocab_and_modules_to_save(llama: Path, tmp_path: Path):
    """The trainer adds a pad token and resizes (pad_to_multiple_of=64): peft then saves the embeddings."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama)
    model.resize_token_embeddings(129, pad_to_multiple_of=64, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[128:].normal_()
    adapter = _make_adapter(model, tmp_path / "dora", use_dora=True, modules_to_save=["lm_head"])
    out = tmp_path / "merged"
    result = merge_adapter(str(llama), str(adapter), str(out))
    assert result.verification.startswith("passed")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 192
    _assert_matches_peft_merge(out, llama, adapter, vocab=192)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert _greedy(merged, PROMPT) == _greedy(_peft(llama, adapter, vocab=192), PROMPT)


def test_gpt2_conv1d_with_added_pad_token(tmp_path: Path):
    """GPT-2's Conv1D layers (fan_in_fan_out), tied embeddings resized, and the adapter's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GPT2_TINY)
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    model = AutoModelForCausalLM.from_pretrained(GPT2_TINY)
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=64, mean_resizing=False)
    adapter = _make_adapter(model, tmp_path / "ad", r=2, lora_alpha=4)
    tok.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"]
    out = tmp_path / "merged"
    result = merge_adapter(str(GPT2_TINY), str(adapter), str(out))
    assert result.verification.startswith("passed")
    _assert_matches_peft_merge(out, GPT2_TINY, adapter, vocab=50304)
    assert AutoTokenizer.from_pretrained(out).pad_token == "<|pad|>"
    ids = tok("The weather today is", return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    want = _greedy(_peft(GPT2_TINY, adapter, vocab=50304), ids)
    assert tok.decode(_greedy(merged, ids)) == tok.decode(want)


@pytest.fixture(scope="module")
def qlora(llama: Path) -> Path:
    """An adapter trained against the NF4 base, in a run directory laid out like `sftdist train`'s."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    run = llama.parent / "qlora-run"
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(llama, quantization_config=bnb, dtype=torch.float32)
    adapter = _make_adapter(model, run / "final", target_modules=["q_proj", "v_proj", "down_proj"])
    quantization = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "auto", "storage_dtype": "auto"}
    recipe = {"model": {"name_or_path": str(llama)}, "method": "qlora", "quantization": quantization}
    (adapter / "sftdist_recipe.yaml").write_text(yaml.safe_dump(recipe))
    history = [{"loss": 2.5, "step": 20}, {"loss": 1.25, "step": 40}, {"train_loss": 1.9, "step": 40}]
    state = {"global_step": 40, "log_history": history}
    (run / "trainer_state.json").write_text(json.dumps(state))
    return adapter


def test_qlora_merges_into_the_dequantized_weights(llama: Path, qlora: Path, tmp_path: Path):
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from transformers import BitsAndBytesConfig

    out = tmp_path / "merged"
    result = merge_adapter(str(llama), str(qlora), str(out))
    assert "dequantized 4-bit" in result.method and result.verification.startswith("passed")
    assert "dequantized 4-bit base + adapter" in result.verification
    ours = _tensors(out)
    ref = _peft(llama, qlora, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    seen = 0
    for name, module in ref.base_model.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):  # every 4-bit layer, with or without LoRA
            want = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            lora_layer = ref.base_model.model.get_submodule(name.removesuffix(".base_layer"))
            if name.endswith(".base_layer"):
                want = want + lora_layer.get_delta_weight("default")
            key = name.removesuffix(".base_layer") + ".weight"
            assert torch.allclose(ours[key], want, atol=1e-6), key
            seen += 1
    assert seen == 14
    card = (out / "README.md").read_text()
    assert "qlora (nf4, double quant on" in card and "dequantized 4-bit" in card
    assert "training steps: 40" in card and "final loss: 1.2500" in card and "method: qlora" in card

    original = tmp_path / "original"
    result = merge_adapter(str(llama), str(qlora), str(original), merge_into="original", verify=False)
    assert "ORIGINAL" in result.method
    other = _tensors(original)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(other[q], ours[q], atol=1e-3)
    _assert_matches_peft_merge(original, llama, qlora)


def test_quant_round_trip_matches_bitsandbytes_for_conv1d(tmp_path: Path):
    """GPT-2 Conv1D weights are quantized transposed by transformers; the round trip must do the same."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel

    from sftdist.merge import QuantSpec, quant_round_trip

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)).save_pretrained(tmp_path)
    stored = _tensors(tmp_path)
    q = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.float32))
    spec = QuantSpec("fp4", False, "test")
    layers = [(n, m) for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 4
    for name, m in layers:
        want = dequantize_4bit(m.weight.data, m.weight.quant_state).float().T  # back to Conv1D's (in, out)
        assert torch.equal(quant_round_trip(stored[name + ".weight"], spec, transposed=True), want), name


def _one_line_error(r, *needles: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_refusals(llama: Path, lora: Path, tmp_path: Path):
    out = tmp_path / "out"
    cli = ("merge-adapter", "--no-verify", "--out", str(out))

    _one_line_error(run_cli(*cli, "--base", str(tmp_path / "nope"), "--adapter", str(lora)), "--base", "does not exist")
    _one_line_error(run_cli(*cli, "--base", str(llama), "--adapter", str(tmp_path / "nope")),
                    "--adapter", "does not exist")
    _one_line_error(run_cli(*cli, "--base", str(llama), "--adapter", str(lora), "--merge-into", "quantized"), "4-bit")
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(run_cli(*cli, "--base", str(llama), "--adapter", str(lora)), "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    shutil.rmtree(out)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(llama / "config.json", pickled)
    torch.save(_tensors(llama), pickled / "pytorch_model.bin")
    _one_line_error(run_cli(*cli, "--base", str(pickled), "--adapter", str(lora)), "pickle", "--allow-pickle")
    bin_adapter = tmp_path / "bin-adapter"
    shutil.copytree(lora, bin_adapter)
    torch.save(_tensors(bin_adapter), bin_adapter / "adapter_model.bin")
    (bin_adapter / "adapter_model.safetensors").unlink()
    _one_line_error(run_cli(*cli, "--base", str(llama), "--adapter", str(bin_adapter)), "pickle")
    assert not out.exists()

    merge_adapter(str(pickled), str(bin_adapter), str(out), allow_pickle=True, verify=False)
    assert set(_tensors(out)) == set(_tensors(llama))


def test_refuses_an_adapter_of_another_model_or_a_base_rewriting_one(llama: Path, lora: Path, tmp_path: Path):
    out = tmp_path / "out"
    cli = ("merge-adapter", "--no-verify", "--out", str(out))
    _one_line_error(run_cli(*cli, "--base", str(GPT2_TINY), "--adapter", str(lora)),
                    "model.layers.0", "does not have")
    wider = _make_llama(tmp_path / "wider", intermediate_size=96)
    _one_line_error(run_cli(*cli, "--base", str(wider), "--adapter", str(lora)),
                    "mlp.down_proj", "(64, 128)", "(64, 96)")
    pissa = tmp_path / "pissa"
    shutil.copytree(lora, pissa)
    cfg = json.loads((pissa / "adapter_config.json").read_text())
    (pissa / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa"}))
    _one_line_error(run_cli(*cli, "--base", str(llama), "--adapter", str(pissa)), "init_lora_weights=pissa")
    assert not out.exists()


def test_failure_midway_leaves_nothing(llama: Path, lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A base shard cut short (another process rewriting it) once the merge has checked every shard
    and written the first: a one-line error, and nothing in or beside --out."""
    import io

    from sftdist.errors import UserError

    broken = tmp_path / "broken"
    shutil.copytree(llama, broken)
    last = sorted(broken.glob("model-*.safetensors"))[-1]

    class CutLastShardAfterTheFirst(io.StringIO):
        def write(self, text: str) -> int:
            if "shard 1/" in text:
                last.write_bytes(last.read_bytes()[:-64])  # header intact, data cut short
            return super().write(text)

    progress = CutLastShardAfterTheFirst()
    monkeypatch.setattr(sys, "stdout", progress)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="not a whole safetensors file"):
        merge_adapter(str(broken), str(lora), str(out))
    assert "shard 1/" in progress.getvalue()  # it had started writing
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]


def test_killed_merge_leaves_a_build_the_next_merge_removes(llama: Path, lora: Path, tmp_path: Path):
    """SIGKILL mid-merge leaves its hidden build beside --out (nothing can clean up after a kill); the
    next merge into the same --out removes it, since its builder is dead, and succeeds."""
    out = tmp_path / "merged"
    argv = [sys.executable, "-m", "sftdist", "merge-adapter", "--base", str(llama), "--adapter", str(lora),
            "--out", str(out), "--no-verify"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if "shard 1/" in line:
            proc.kill()
            break
    proc.wait(timeout=60)
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".merged.partial-") and leftover.name.endswith(f"-{proc.pid}")
    assert any(leftover.glob("*.safetensors"))  # killed mid-work
    r = run_cli("merge-adapter", "--base", str(llama), "--adapter", str(lora), "--out", str(out), "--no-verify")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    _assert_matches_peft_merge(out, llama, lora)


def _hub_cache(root: Path, repo_id: str, model: Path) -> Path:
    """A Hugging Face cache holding `model` as the snapshot of hub id `repo_id` (the layout huggingface_hub writes)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def test_a_hub_id_base_resolves_through_the_cache_offline(llama: Path, lora: Path, tmp_path: Path):
    """merge-adapter and export --merge of an adapter whose base is a hub id in the local cache (as training
    and generate load it), offline; a hub id that is not cached is one line."""
    env = {"HF_HUB_CACHE": str(_hub_cache(tmp_path / "hub", "sftdist-test/tiny-llama", llama)), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "merged"
    r = run_cli("merge-adapter", "--base", "sftdist-test/tiny-llama", "--adapter", str(lora), "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_matches_peft_merge(out, llama, lora)

    adapter = tmp_path / "adapter"  # what a LoRA run's checkpoint says of a hub-id base
    shutil.copytree(lora, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "sftdist-test/tiny-llama"}))
    r = run_cli("export", str(adapter), "--merge", "--out", str(tmp_path / "exported"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_matches_peft_merge(tmp_path / "exported", llama, lora)

    r = run_cli("merge-adapter", "--base", "sftdist-test/not-cached", "--adapter", str(lora), "--out",
                str(tmp_path / "none"), env=env)  # fmt: skip
    _one_line_error(r, "sftdist-test/not-cached: not a local path, and the model is not in the Hugging Face cache",
                    "HF_HUB_OFFLINE is set")
    assert not (tmp_path / "none").exists()


def test_qlora_merge_stays_on_the_device_it_names_where_cuda_is_visible(llama: Path, qlora: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """On a GPU machine transformers puts a 4-bit model on the current CUDA device unless told otherwise, and a
    `--device cpu` merge then crashed in its verification (CPU prompts, CUDA weights). With CUDA reported visible
    here, every tensor the real merge path creates (arithmetic, 4-bit reference, verification) is on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Devices(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.seen.add(t.device.type)
            return out

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with Devices() as mode:
        result = merge_adapter(str(llama), str(qlora), str(tmp_path / "merged"), device="cpu")
    assert result.verification.startswith("passed") and "dequantized 4-bit base + adapter" in result.verification
    assert mode.seen == {"cpu", "meta"}  # meta: the layout, read from a model built without storage


def test_base_with_fp8_tensors_merges_and_keeps_them(llama: Path, tmp_path: Path):
    """A base holding F8_E4M3 and F8_E5M2 tensors (fp8 checkpoints): the shard writer reads and writes them as they are."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    base = tmp_path / "fp8-base"
    shutil.copytree(llama, base)
    fp8 = {}
    for f in sorted(base.glob("*.safetensors")):
        state = load_file(f)
        for name in state:
            if name.endswith(("mlp.up_proj.weight", "mlp.down_proj.weight")):
                dtype = torch.float8_e4m3fn if "up_proj" in name else torch.float8_e5m2
                state[name] = fp8[name] = state[name].to(dtype)
        save_file(state, f, metadata={"format": "pt"})
    assert len(fp8) == 4
    adapter = _make_adapter(AutoModelForCausalLM.from_pretrained(llama), tmp_path / "lora", target_modules=["q_proj"])
    out = tmp_path / "merged"
    r = run_cli("merge-adapter", "--base", str(base), "--adapter", str(adapter), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    merged = _tensors(out)
    for name, tensor in fp8.items():
        assert merged[name].dtype == tensor.dtype and merged[name].view(torch.uint8).equal(tensor.view(torch.uint8)), name
    assert not merged["model.layers.0.self_attn.q_proj.weight"].equal(_tensors(llama)["model.layers.0.self_attn.q_proj.weight"])
