# Switchboard: every target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 9400
SERVE_ARGS ?=

.PHONY: setup model model-gemma serve test test-slow lint format protos bench gemma-e2e \
	bench-peers bench-quality bench-deps gpu-check soak clean

$(STAMP): requirements/cpu.txt requirements/runtime.txt requirements/runtime-cpu.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/cpu.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(PY) -m server.model_store

# the second bundled model (Gemma 3 270M), for the slow tests and benchmarks that use it
model-gemma: setup
	$(PY) -m server.model_store gemma-3-270m

serve: model
	$(VENV)/bin/switchboard serve --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT) $(SERVE_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .

protos: setup
	$(PY) protos/generate.py

test: model lint
	$(PY) -m pytest -q

test-slow: model model-gemma
	$(PY) -m pytest -q -m slow

bench: model
	$(PY) -m benchmarks

# train a LoRA on Gemma 3 270M, trainer eval it, serve it, compare (docs/trainer.md)
gemma-e2e: model-gemma
	$(PY) -m benchmarks.gemma_e2e $(GEMMA_E2E_ARGS)

# Against llama.cpp's llama-server (never part of `make test`): needs cmake and a C++
# compiler to build it once into ~/.cache/switchboard/peers/, and the bench extra.
PEERS_ARGS ?=
bench-deps: setup
	@if ! command -v cmake >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then \
	  echo "bench-peers: installing cmake, g++ and ninja-build (Debian) to build llama.cpp"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    cmake g++ ninja-build >/dev/null; fi
	$(PY) -m pip install --quiet -r requirements/bench.txt

bench-peers: model bench-deps
	$(PY) -m benchmarks.peers $(PEERS_ARGS)

bench-quality: model bench-deps
	$(PY) -m benchmarks.llamacpp
	$(PY) -m benchmarks.quality

# On a machine with one CUDA card (never in CI): fails with "no CUDA device" elsewhere.
gpu-check: model
	$(PY) -m benchmarks.gpu_check

soak: model
	$(PY) -m benchmarks.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
