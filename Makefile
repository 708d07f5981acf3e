# duet: the two commands are `make demo` and `make test` (README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
DURATION ?= 20

.PHONY: demo test lint bench train train-fact fact-study bundle bundles eval verify-systemd clean

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
	$(BIN)/pip install -q -e ".[sim,export,camera,dev]"
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

# Long runs: make targets, not tests.
CKPT ?= checkpoints
train: $(VENV)/.dev        # reproduces both reference models from fixed seeds (~15 min on 2 CPU cores, data cached)
	$(BIN)/duet train --out $(CKPT)

# FACT planner (tokenizer + code-predicting planner) on the same cached data as `train`.
FACT ?= runs/fact
train-fact: $(VENV)/.dev   # fixed seeds, 2 CPU threads
	$(BIN)/duet train-fact --out $(FACT)

fact-study: $(VENV)/.dev   # reconstruction error vs code length: FACT, uniform binning, DCT
	$(BIN)/duet fact-study --json $(FACT)/study.json

# INT8: the planner's convolutions (QDQ); its transformer and MLP layers and the follower
# stay fp32 (see README, "Evaluation of the reference policy").
INT8 := --follower-precision fp32 --int8-ops Conv
bundle: $(VENV)/.dev       # the shipped reference bundle
	$(BIN)/duet export --planner $(CKPT)/planner.pt --follower $(CKPT)/follower.pt \
	  --out bundles/reference --precision int8 $(INT8) --config configs/sim.yaml \
	  --calib-data $(CKPT)/calib.npz

bundles: $(VENV)/.dev      # fp32 / fp16 / int8 bundles for the evaluation table
	for p in fp32 fp16 int8; do \
	  $(BIN)/duet export --planner $(CKPT)/planner.pt --follower $(CKPT)/follower.pt \
	    --out runs/bundles/$$p --precision $$p $$([ $$p = int8 ] && echo "$(INT8)") \
	    --config configs/sim.yaml --calib-data $(CKPT)/calib.npz || exit 1; done

eval: bundles              # closed loop through the runtime, 100 episodes per precision
	$(BIN)/duet eval --bundle runs/bundles/fp32 --bundle runs/bundles/fp16 --bundle runs/bundles/int8 \
	  --episodes 100 --ablation-episodes 50 --checkpoints $(CKPT) --out runs/eval --json runs/eval/eval.json

bench: $(VENV)/.dev
	$(BIN)/python bench/follower_loop.py --duration 20
	$(BIN)/python -m bench.drivers --cycles 2000
	$(BIN)/python bench/engines.py

verify-systemd:            # boots a real systemd in a container (root, debootstrap, systemd-container)
	systemd/verify-in-container.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
