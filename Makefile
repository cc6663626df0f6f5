# Every target creates .venv on a fresh machine: `make serve` with the runtime dependencies only,
# `make test` / `make lint` with the dev extras too (test tools, Ray, data sources). torch/torchvision
# are pinned to the builds that lie on this machine's disk (other versions download gigabytes);
# override TORCH_PINS elsewhere.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1

.PHONY: venv runtime test lint serve check-image clean

$(BIN)/.runtime: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.installed: $(BIN)/.runtime
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

runtime: $(BIN)/.runtime

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

# The server on :8000 (RLRR_PORT) with the in-house backbone, serving store/: a writable copy of
# the eight demo adapters in demo/store (git-tracked, never written), made once when store/ does
# not exist. `python -m trainer` writes there too, and uploads land there. RLRR_STORE=DIR serves
# another store (seeded the same way when it does not exist).
serve: export RLRR_STORE ?= store
serve: runtime
	test -e "$$RLRR_STORE" || cp -R demo/store "$$RLRR_STORE"
	$(BIN)/python -m app

# Build the image and run it (podman, as root; see deploy/check-image.sh). CI runs it.
check-image:
	deploy/check-image.sh

clean:
	rm -rf $(VENV) .cache .pytest_cache
