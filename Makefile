# The README's two commands: `make demo` and `make test`. Both create the virtual environment first.
VENV ?= .venv
# A CPU build on CPU-only machines; on a GPU machine set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
BIN = $(VENV)/bin

$(BIN)/sftdist: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: demo test
demo: $(BIN)/sftdist
	$(BIN)/sftdist make-tiny-model models/tiny
	$(BIN)/sftdist train recipes/demo.yaml --overwrite
	$(BIN)/sftdist generate runs/demo/final --compare models/tiny \
		--prompts-file sftdist/demo/heldout.jsonl --greedy --max-new-tokens 16

test: $(BIN)/sftdist
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider
