# Every target creates .venv on a fresh machine. torch/torchvision are pinned to the builds that
# lie on this machine's disk (other versions download gigabytes); override TORCH_PINS elsewhere.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1

.PHONY: venv test lint serve clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

# The embedded demo: the in-house backbone (package default) and the eight committed mini-VTAB
# adapters. Point RLRR_STORE (and RLRR_BACKBONE, ...) elsewhere to serve your own.
serve: export RLRR_STORE ?= demo/store
serve: venv
	$(BIN)/python -m app

clean:
	rm -rf $(VENV) .cache .pytest_cache
