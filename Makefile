# The README's two commands: `make demo` and `make test`. Both create the virtual environment first.
VENV ?= .venv
# torch is installed first, in its own pip call. TORCH_SPEC picks the version; TORCH_INDEX, when set, is the
# package index that torch comes from, for a CUDA build (docs/install.md), e.g.
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cu130
# Unset, pip's own configuration decides (PyPI's torch is a CUDA build on Linux x86_64; a CPU machine can
# point TORCH_INDEX at https://download.pytorch.org/whl/cpu to skip the CUDA libraries).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN = $(VENV)/bin

$(BIN)/sftdist: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# The GPU kit (docs/selftest.md, "The GPU kit"): wheels for Python 3.12 on x86_64 Linux that a CUDA image lacks,
# install.sh and gpu-check.sh, at most 40 MiB. Downloads, so it is not part of `make test`.
GPU_KIT ?= build/gpu-kit
# bitsandbytes ships a library per CUDA version; keep the one of the target's torch (CUDA 13.0: 130).
BNB_CUDA ?= 130

.PHONY: demo test gpu-kit
demo: $(BIN)/sftdist
	$(BIN)/sftdist make-tiny-model models/tiny
	$(BIN)/sftdist train recipes/demo.yaml --overwrite
	$(BIN)/sftdist generate runs/demo/final --compare models/tiny \
		--prompts-file sftdist/demo/heldout.jsonl --greedy --max-new-tokens 16

test: $(BIN)/sftdist
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

gpu-kit: $(BIN)/sftdist
	$(BIN)/python launch/gpu-kit/build_kit.py --out $(GPU_KIT) --bnb-cuda $(BNB_CUDA)

# The base-vs-fine-tuned table of the demo (docs/eval.md), after `make demo`: the base, each kept checkpoint
# and final/ on the demo's generative (exact match) and multiple-choice (log-likelihood) tasks.
.PHONY: eval-demo
eval-demo: $(BIN)/sftdist
	$(BIN)/sftdist eval runs/demo --checkpoints --compare models/tiny \
		--tasks sftdist_demo_gen,sftdist_demo_mc --out runs/demo/eval.json
