# duet: the two commands are `make demo` and `make test` (README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
DURATION ?= 20

.PHONY: demo test lint typecheck bench train bundle eval clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The demo needs the runtime and the sim only (no torch).
$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[sim]"
	touch $@

# Tests exercise export too, so they pull the pinned CPU torch and the dev tools.
# tensorrt-stubs declares the full TensorRT runtime as a dependency; only its stubs are wanted.
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[sim,export,dev]"
	$(BIN)/pip install -q --no-deps "tensorrt-stubs>=10.0"
	touch $@

demo: $(VENV)/.demo
	$(BIN)/duet run --config configs/sim.yaml --set run_dir=$(CURDIR)/runs/demo --duration $(DURATION) --summary-json runs/demo/summary.json

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
