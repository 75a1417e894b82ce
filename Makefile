# The README's two commands: `make demo` (set-up + the main job) and `make test`.
# Override the torch build with e.g. `make setup TORCH_SPEC="torch==2.6.0"`, and take a CUDA build from its
# wheel index with e.g. `TORCH_SPEC="torch==2.9.1" TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: setup setup-dev demo demo-seeds test test-all bench routing-ablation lint
# `setup`: torch and the package with its server, what the demo, `serve` and the benchmarks run on;
# `setup-dev` adds the test and lint tools (transformers for the parity tests, the HTTP clients,
# lm-evaluation-harness, ruff).
setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[serve]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/behemoth demo --out out/demo --force

# The README's demo figures: the whole story over 3 seeds, with each seed's figures and the machine recorded.
demo-seeds: setup
	$(BIN)/behemoth demo --out out/demo-seeds --force --seeds 3 --results benchmarks/results/demo_seeds_cpu.json

test: setup-dev
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-all: setup-dev
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/moe_layer.py --preset cpu

# The README's routing table: each balancing method on the demo's three MoE recipes, 3 seeds (resumable).
routing-ablation: setup
	$(BIN)/python benchmarks/routing.py --jobs 2

lint: setup-dev
	$(BIN)/ruff check src tests benchmarks

# Every GPU figure in one run (benchmarks/gpu_check.py, under 8 minutes on one H100/H200). On a bare GPU
# machine without the venv: `make gpu-check GPU_PYTHON=python3 GPU_OUT=out/gpu` (src/ goes on PYTHONPATH);
# rehearse on the CPU with `make gpu-check GPU_ARGS=--dry-run`.
GPU_PYTHON ?= $(BIN)/python
GPU_OUT ?= out/gpu-check
GPU_ARGS ?=
.PHONY: gpu-check
gpu-check: $(if $(filter $(BIN)/python,$(GPU_PYTHON)),setup-dev)
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) benchmarks/gpu_check.py --out $(GPU_OUT) $(GPU_ARGS)
