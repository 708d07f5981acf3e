# duet: the two commands are `make demo` and `make test` (README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
DURATION ?= 20
FUZZ_S ?= 120
FUZZ_JOBS ?= 1

.PHONY: demo demo-remote test test-fast test-system lint bench train train-fact fact-study bundle bundle-fact bundles eval data-loop data-loop-robot follower-table fuzz verify-systemd verify-aarch64 verify-vla verify-vla-ar clean

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
	$(BIN)/pip install -q -e ".[sim,export,camera,dataset,dev]"
	# Ray Serve (~80 MB) backs one off-board-planner test; an index hiccup must not stop the run
	$(BIN)/pip install -q -e ".[serve]" || echo "warning: ray[serve] not installed: the Ray Serve test skips"
	$(BIN)/pip install -q --no-deps "tensorrt-stubs>=10.0"
	touch $@

# `make demo ROBOT=so101` / `ROBOT=arm7`: another shipped robot (docs/your-robot.md) for DURATION s
# with its own planner, bundles/ROBOT (trained and exported here when missing: a small
# planner, ROBOT_TRAIN; ~10 min on 2 idle cores, data cached under data/ROBOT). Without ROBOT,
# duet's arm with the reference bundle, as above.
ROBOT ?=
ifneq ($(filter-out so101 arm7,$(ROBOT)),)
$(error ROBOT=$(ROBOT): the shipped robots are so101 and arm7 (docs/your-robot.md))
endif
ROBOT_CONFIG = $(if $(filter so101,$(ROBOT)),configs/so101_sim.yaml,configs/arm7_can_sim.yaml)
ROBOT_TRAIN ?= --episodes 30 --scenes 400 --walks 4000 --steps 600 --follower-steps 400 --workers 2
ifeq ($(ROBOT),)
demo: $(VENV)/.demo
	$(BIN)/duet run --config configs/sim.yaml --set run_dir=$(CURDIR)/runs/demo --duration $(DURATION) --summary-json runs/demo/summary.json
else
demo: $(VENV)/.demo bundles/$(ROBOT)/manifest.json
	$(BIN)/duet run --config $(ROBOT_CONFIG) --set run_dir=$(CURDIR)/runs/demo-$(ROBOT) --set bundle.path=$(CURDIR)/bundles/$(ROBOT) --duration $(DURATION) --summary-json runs/demo-$(ROBOT)/summary.json
endif

bundles/so101/manifest.json bundles/arm7/manifest.json: | $(VENV)/.dev
	$(BIN)/duet train --config $(ROBOT_CONFIG) --out runs/$(ROBOT)/checkpoints --data-dir data/$(ROBOT) $(ROBOT_TRAIN)
	$(BIN)/duet export --module policy.reference:modules --checkpoint runs/$(ROBOT)/checkpoints \
	  --assets runs/$(ROBOT)/checkpoints --contract runs/$(ROBOT)/checkpoints/contract.yaml \
	  --precision fp32 --out bundles/$(ROBOT)

# The sim robot with its planner off-board: a planner server in a second process, reached
# over CURVE TCP on the loopback (keys made here, the robot's in the server's allow-list).
REMOTE_PORT ?= 5571
DR := runs/demo-remote
demo-remote: $(VENV)/.demo
	rm -rf $(DR) && mkdir -p $(DR)/keys/allow
	$(BIN)/duet keys generate server --out $(DR)/keys/server >/dev/null
	$(BIN)/duet keys generate robot-1 --out $(DR)/keys/robot >/dev/null
	cp $(DR)/keys/robot/robot-1.key $(DR)/keys/allow/
	$(BIN)/duet planner --config configs/sim.yaml --set run_dir=$(CURDIR)/$(DR)/server \
	  --set planner.serve.key=$(DR)/keys/server/server.key_secret \
	  --set planner.serve.allow=$(DR)/keys/allow --listen tcp://127.0.0.1:$(REMOTE_PORT) & \
	server=$$!; trap 'kill $$server; wait $$server' EXIT; \
	$(BIN)/duet run --config configs/sim.yaml --set run_dir=$(CURDIR)/$(DR)/run \
	  --set planner.remote.endpoint=tcp://127.0.0.1:$(REMOTE_PORT) \
	  --set planner.remote.server_key=$(DR)/keys/server/server.key \
	  --set planner.remote.robot_key=$(DR)/keys/robot/robot-1.key_secret \
	  --duration $(DURATION) --summary-json $(DR)/summary.json

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	# the manual: a broken link or page fails. The env var quiets Material's end-of-life notice
	# (May 2027; its successor is Zensical): known, and said in docs/architecture.md
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q -d $$(mktemp -d)
	$(BIN)/vermin --target=3.10- --no-tips --violations runtime drivers export sim policy
	$(BIN)/python -m pytest -q -n 2 --dist loadfile  # a file per worker: module fixtures built once

# The inner loop: the unit and wire tests (codecs, drivers against emulators in-process,
# config, core), none that starts a stack or a `duet` process (`system`) or trains or exports
# a model (`slow`); under 2 minutes on 2 cores. `make test` above stays the full run.
# Tests are dealt out one at a time (--dist load): the fast lane has no heavy module fixtures.
FAST := not system and not slow
test-fast: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 -m "$(FAST)"

# The rest of the full run: stacks, processes, training and export.
test-system: $(VENV)/.dev
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not ($(FAST))"

lint: $(VENV)/.dev
	$(BIN)/ruff check .

# Long runs: make targets, not tests.
CKPT ?= checkpoints
train: $(VENV)/.dev        # reproduces both reference models from fixed seeds (~15 min on 2 CPU cores, data cached)
	$(BIN)/duet train --out $(CKPT)

# FACT planner (tokenizer + code-predicting planner) on the same cached data as `train`,
# starting from the reference planner (its perception frozen).
FACT ?= runs/fact
$(CKPT)/planner.pt: | $(VENV)/.dev
	$(BIN)/duet train --out $(CKPT)

train-fact: $(CKPT)/planner.pt  # fixed seeds, 2 CPU threads
	$(BIN)/duet train-fact --out $(FACT) --init-planner $(CKPT)/planner.pt

# The shipped FACT bundle from scratch: data, reference planner, FACT tokenizer + planner,
# export (fp32: a flipped argmax code fails fp16/int8 parity). Times: docs/results/fact.md.
bundle-fact: train-fact
	$(BIN)/duet export --module policy.fact_bundle:modules --checkpoint $(FACT) \
	  --contract $(FACT)/fact_contract.yaml --assets $(FACT) --out bundles/fact

fact-study: $(VENV)/.dev   # reconstruction error vs code length: FACT, uniform binning, DCT
	$(BIN)/duet fact-study --json $(FACT)/study.json

# INT8: the planner's convolutions (QDQ); its transformer and MLP layers and the follower
# stay fp32 (see docs/results/evaluation.md).
INT8 := --follower-precision fp32 --int8-ops Conv
# The reference pair is exported like any model: a factory + its contract.
REFERENCE := --module policy.reference:modules --checkpoint $(CKPT) \
  --contract policy/reference_contract.yaml --assets $(CKPT)
bundle: $(VENV)/.dev       # the shipped reference bundle
	$(BIN)/duet export $(REFERENCE) --out bundles/reference --precision int8 $(INT8)

bundles: $(VENV)/.dev      # fp32 / fp16 / int8 bundles for the evaluation table
	for p in fp32 fp16 int8; do \
	  $(BIN)/duet export $(REFERENCE) --out runs/bundles/$$p --precision $$p \
	    $$([ $$p = int8 ] && echo "$(INT8)") || exit 1; done

eval: bundles              # closed loop through the runtime, 100 episodes per precision
	$(NICE) $(BIN)/duet eval --bundle runs/bundles/fp32 --bundle runs/bundles/fp16 --bundle runs/bundles/int8 \
	  --episodes 100 --ablation-episodes 50 --checkpoints $(CKPT) --out runs/eval --json runs/eval/eval.json

# The data loop on the sim (docs/data-loop.md): a task the reference was never told in these
# words ("touch B after A": A first) is teleoperated by the scripted expert while the recorder
# records, exported as a LeRobot v3 dataset, the planner fine-tuned on it mixed with sim data,
# exported, added to and activated in a staging bundle store, and evaluated before/after on
# held-out seeds (and on the original phrasing, to show nothing was forgotten).
LOOP ?= runs/data-loop
LOOP_EPISODES ?= 24
LOOP_STEPS ?= 200
LOOP_EVAL ?= 30
LOOP_TASK := --set sim.phrasing=after --set sim.two_step_fraction=1.0 --set sim.seed=7
# a shared workstation has bursts of late ticks a robot's own core does not (tests/stack.py)
LOOP_HOST := --set follower.deadline_storm.misses=400 --set follower.bus_error_threshold=25
FP32 := --contract policy/reference_contract.yaml --precision fp32
NICE ?= nice -n 19         # the CPU-heavy steps; teleop runs in real time, not niced
data-loop: $(VENV)/.dev    # ~37 min on 2 busy shared CPU cores; CKPT= the checkpoints to start from
	rm -rf $(LOOP) && mkdir -p $(LOOP)
	$(BIN)/duet teleop --config configs/sim.yaml $(LOOP_TASK) $(LOOP_HOST) \
	  --episodes $(LOOP_EPISODES) --out $(LOOP)/recordings --run-dir $(CURDIR)/$(LOOP)/run
	$(NICE) $(BIN)/duet dataset export $(LOOP)/recordings/episodes --out $(LOOP)/dataset \
	  --format lerobot --fps 10 --outcome success
	$(NICE) $(BIN)/duet train --dataset $(LOOP)/dataset --init $(CKPT) --out $(LOOP)/checkpoints \
	  --steps $(LOOP_STEPS) --data-dir data
	$(NICE) $(BIN)/duet export --module policy.reference:modules --checkpoint $(CKPT) \
	  --assets $(CKPT) $(FP32) --out $(LOOP)/bundle-before
	$(NICE) $(BIN)/duet export --module policy.reference:modules --checkpoint $(LOOP)/checkpoints \
	  --assets $(LOOP)/checkpoints $(FP32) --out $(LOOP)/bundle-after
	$(BIN)/duet bundle add $(LOOP)/bundle-after --store $(LOOP)/store --config configs/sim.yaml
	$(BIN)/duet bundle activate $$($(BIN)/python -c "import json; print(json.load(open( \
	  '$(LOOP)/bundle-after/manifest.json'))['version'])") --store $(LOOP)/store \
	  --config configs/sim.yaml
	$(NICE) $(BIN)/duet eval --bundle $(LOOP)/bundle-before --phrasing after --episodes $(LOOP_EVAL) \
	  --ablation-episodes 0 --out $(LOOP)/eval-before
	$(NICE) $(BIN)/duet eval --bundle $(LOOP)/store/current --phrasing after --episodes $(LOOP_EVAL) \
	  --ablation-episodes 0 --out $(LOOP)/eval-after
	$(NICE) $(BIN)/duet eval --bundle $(LOOP)/bundle-before --phrasing then --episodes $(LOOP_EVAL) \
	  --ablation-episodes 0 --out $(LOOP)/eval-before-then
	$(NICE) $(BIN)/duet eval --bundle $(LOOP)/store/current --phrasing then --episodes $(LOOP_EVAL) \
	  --ablation-episodes 0 --out $(LOOP)/eval-after-then
	$(BIN)/python -m policy.loop_report $(LOOP)

# The data loop on another shipped robot, at smoke sizes (`make data-loop-robot ROBOT=so101` or
# ROBOT=arm7; docs/data-loop.md): the expert teleoperates the robot while the recorder records,
# the recordings become a LeRobot dataset, the robot's planner (runs/ROBOT/checkpoints, made
# with bundles/ROBOT) is fine-tuned on it and exported, its follower is fitted and trained
# from the same recordings (each tick's command and measured state: `duet train-follower`),
# and the bundle before and after is evaluated on the robot.
RLOOP = runs/data-loop-$(ROBOT)
RLOOP_EPISODES ?= 4
RLOOP_STEPS ?= 50
RLOOP_EVAL ?= 4
data-loop-robot: bundles/$(ROBOT)/manifest.json
	$(if $(ROBOT),,$(error data-loop-robot: name the robot, ROBOT=so101 or ROBOT=arm7))
	rm -rf $(RLOOP) && mkdir -p $(RLOOP)
	$(BIN)/duet teleop --config $(ROBOT_CONFIG) $(LOOP_HOST) --episodes $(RLOOP_EPISODES) \
	  --out $(RLOOP)/recordings --run-dir $(CURDIR)/$(RLOOP)/run
	$(NICE) $(BIN)/duet dataset export $(RLOOP)/recordings/episodes --out $(RLOOP)/dataset \
	  --format lerobot --fps 10 --outcome success
	$(NICE) $(BIN)/duet train --config $(ROBOT_CONFIG) --dataset $(RLOOP)/dataset \
	  --init runs/$(ROBOT)/checkpoints --out $(RLOOP)/checkpoints --steps $(RLOOP_STEPS) \
	  --data-dir data/$(ROBOT) --episodes 30
	$(NICE) $(BIN)/duet export --module policy.reference:modules --checkpoint $(RLOOP)/checkpoints \
	  --assets $(RLOOP)/checkpoints --contract runs/$(ROBOT)/checkpoints/contract.yaml \
	  --precision fp32 --out $(RLOOP)/bundle-after
	$(NICE) $(BIN)/duet train-follower --config $(ROBOT_CONFIG) --recordings $(RLOOP)/recordings/episodes \
	  --bundle $(RLOOP)/bundle-after --out $(RLOOP)/followers --steps $(RLOOP_STEPS)
	$(NICE) $(BIN)/duet eval --config $(ROBOT_CONFIG) --bundle bundles/$(ROBOT) --bundle $(RLOOP)/bundle-after \
	  --episodes $(RLOOP_EVAL) --ablation-episodes 0 --out $(RLOOP)/eval

# A follower for the sim robot from its own motion (docs/follower-for-your-robot.md):
# identify the servos, train none / model-free / learned followers, then the table of each
# under held-out references, holds and three planners' chunks (reference, FACT, and the flow
# planner of the bring-your-own tests). `make follower-table ROBOT=so101` (or arm7): the same
# on that robot, with its planner (bundles/ROBOT, made as for `make demo ROBOT=`), a FACT
# planner from it at smoke size and the flow planner for its joints (~10 min on 2 idle cores).
FOLLOW ?= runs/follower$(if $(ROBOT),-$(ROBOT))
comma := ,
# the SO-101's shoulder overloads its STS3215 at the default --speed 0.5 over +-0.6 rad
IDENTIFY_so101 := --speed 0.3 --span 0.4
ifeq ($(ROBOT),)
follower-table: $(VENV)/.dev
FT_CONFIG := configs/sim.yaml
FT_PLANNER := bundles/reference
FT_FACT := bundles/fact
else
follower-table: $(VENV)/.dev bundles/$(ROBOT)/manifest.json
FT_CONFIG := $(ROBOT_CONFIG)
FT_PLANNER := bundles/$(ROBOT)
FT_FACT := $(FOLLOW)/fact-bundle
endif
follower-table:
	rm -rf $(FOLLOW) && mkdir -p $(FOLLOW)
	$(if $(ROBOT),$(NICE) $(BIN)/duet train-fact --smoke --config $(FT_CONFIG) --out $(FOLLOW)/fact \
	  --data-dir data/$(ROBOT) --init-planner runs/$(ROBOT)/checkpoints/planner.pt --threads 1)
	$(if $(ROBOT),$(NICE) $(BIN)/duet export --module policy.fact_bundle:modules \
	  --checkpoint $(FOLLOW)/fact --contract $(FOLLOW)/fact/fact_contract.yaml --assets $(FOLLOW)/fact \
	  --precision fp32 --calib 4 --parity-samples 2 --out $(FT_FACT))
	$(BIN)/duet identify --config $(FT_CONFIG) --run-dir $(CURDIR)/$(FOLLOW)/run \
	  --out $(FOLLOW)/identify --yes $(LOOP_HOST) $(IDENTIFY_$(ROBOT))
	$(NICE) $(BIN)/duet train-follower --config $(FT_CONFIG) --recordings $(FOLLOW)/identify/episodes \
	  --bundle $(FT_PLANNER) --out $(FOLLOW)/followers
	$(BIN)/python -c "import sys; from pathlib import Path; sys.path.insert(0, 'tests'); \
	  from byo_policies import flow_bundle; flow_bundle(Path('$(FOLLOW)/flow')$(if $(ROBOT),$(comma) Path('$(FT_CONFIG)')))"
	$(NICE) $(BIN)/duet follower-table --followers $(FOLLOW)/followers --config $(FT_CONFIG) \
	  --planner reference=$(FT_PLANNER) --planner fact=$(FT_FACT) --planner flow=$(FOLLOW)/flow

bench: $(VENV)/.dev
	$(BIN)/python -m bench.follower_loop --duration 20
	$(BIN)/python -m bench.drivers --cycles 2000
	$(BIN)/python bench/engines.py

fuzz: $(VENV)/.dev         # coverage-guided fuzzing of every decoder (atheris), FUZZ_S seconds each, FUZZ_JOBS side by side
	$(BIN)/python tests/fuzz_decoders.py --seconds $(FUZZ_S) --jobs $(FUZZ_JOBS)

verify-systemd:            # boots a real systemd in a container (root, debootstrap, systemd-container; VENV=... for another venv)
	systemd/verify-in-container.sh

# A π0/SmolVLA-shaped planner of 0.61 B parameters (2.4 GB fp32, random weights, no downloads):
# export with the prefix weight-only int8 and the expert fp32, bundle (external data), verify,
# latency per stage, 30 s live on the sim (docs/large-planners.md). ~8 GB RAM; not in `make test`.
VLA_PREFIX ?= int8w
# Then the autoregressive-token variant (verify-vla-ar).
verify-vla: $(VENV)/.dev
	rm -rf runs/verify-vla runs/verify-vla-ar
	$(BIN)/python -m bench.verify_vla --out runs/verify-vla/bundle --prefix $(VLA_PREFIX)
	$(BIN)/python -m bench.verify_vla --ar --out runs/verify-vla-ar/bundle

# The autoregressive-token variant alone: 0.35 B parameters (a vision tower + a Qwen2-shaped
# decoder that decodes bins action tokens through the loop stage over a KV buffer), fp32, the
# same figures and live run. ~6 GB RAM; not in `make test`.
verify-vla-ar: $(VENV)/.dev
	rm -rf runs/verify-vla-ar
	$(BIN)/python -m bench.verify_vla --ar --out runs/verify-vla-ar/bundle

verify-aarch64:            # arm64 Debian under qemu-user: wheels-only install, parity, 10 s stack (root; ~10 min, first run ~1 h)
	systemd/verify-aarch64.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
