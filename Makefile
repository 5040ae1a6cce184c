# The README's two commands are `make sweep` and `make test`; both set up first (idempotent, seconds when done).
SHELL := /bin/bash
VENV  := .venv
BIN   := $(VENV)/bin
SPEC  ?= sweeps/width.yaml

.PHONY: setup sweep smoke test test-slow test-cluster test-cluster-hosts lint bench bench-scale bench-gpu gpu-bundle gpu-check-tiny clean

setup:
	@scripts/setup.sh

sweep: setup  ## the main job: the width x steps sweep on Fashion-MNIST, local Ray, local MLflow
	$(BIN)/bvit-sweep launch $(SPEC)

smoke: setup
	$(BIN)/bvit-sweep launch sweeps/smoke.yaml

test: setup  ## default suite (slow tests excluded)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-slow: setup  ## only the slow tests (real training runs, multi-node)
	$(BIN)/pytest -q -m slow

test-cluster: setup  ## as root: a real compose cluster (PostgreSQL, MLflow, Ray head + 2 workers), checked end to end
	scripts/test-cluster.sh

test-cluster-hosts: setup  ## as root: a head host and two worker hosts sharing only ports and an S3 server (docker/compose.head.yaml, compose.worker.yaml)
	scripts/test-cluster.sh hosts

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/run_all.py

bench-scale: setup  ## the orchestrator's cost at N = 100, 400 and 1,000 tiny trials (bench/scale.py; ~1 h here)
	BVIT_BENCH_SCALE_N="100 400 1000" $(BIN)/python bench/run_all.py --only scale.py

bench-gpu: setup  ## bViT-B/16 vs ViT-B/16 on the GPU: results/gpu/<date>.md (TINY=1: the CPU check)
	$(BIN)/python bench/gpu.py $(if $(TINY),--tiny --out .gpu-out/results/gpu)

gpu-bundle:  ## what the device machine lacks, in carry-sized parts: .gpu-bundle/ (prints the device calls)
	scripts/gpu-bundle.sh

gpu-check-tiny: setup  ## the device script's whole path on this CPU, tiny shapes (a few minutes)
	scripts/gpu-check.sh --tiny

clean:
	rm -rf $(VENV) .pytest_cache
