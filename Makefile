# shopml: the two commands a new user types are `make run` and `make test`.
# Everything else is set up on demand (a virtual environment in .venv, pinned by
# constraints.txt) and is safe to run again.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHOPML_HOME ?= $(CURDIR)/.shopml
export SHOPML_HOME
CONTAINER_TOOL ?= docker
IMAGE_REGISTRY ?= ghcr.io/shopml
IMAGE_TAG ?= 0.1.0
TORCH_VARIANT ?= cpu

.DEFAULT_GOAL := help
.PHONY: help install run test test-slow test-unit test-integration lint format typecheck compile serve services images bench-data bench-features bench-search bench-serve bench-train clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e ".[dev]" -c constraints.txt
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install shopml with pinned dependencies

run: install ## Run the whole lifecycle on MovieLens-100K and show the results
	$(BIN)/shopml run

services: ## Install what the tests start on 127.0.0.1 (redis-server) and the load generator (wrk)
	@{ command -v redis-server && command -v wrk; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq redis-server wrk >/dev/null; \
	  elif ! command -v redis-server >/dev/null 2>&1; then \
	    echo "redis-server is needed by the tests: install it (e.g. apt-get install redis-server wrk)"; exit 1; \
	  else echo "wrk is missing: the load-benchmark test is skipped (apt-get install wrk)"; fi; }

test: install services lint typecheck ## Lint, type-check and run every test but the slow ones
	$(BIN)/pytest -m "not slow"

test-slow: install services ## The slow tests (real-catalog search evaluation, many minutes)
	$(BIN)/pytest -m slow

test-unit: install ## Only the fast unit tests
	$(BIN)/pytest tests/unit

test-integration: install services ## Only the integration tests (real services on 127.0.0.1)
	$(BIN)/pytest -m integration

lint: install ## ruff format check and lint
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install ## Reformat and fix what ruff can
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install ## mypy over the packages
	$(BIN)/mypy

compile: install ## Write the pipeline YAML for the Kubeflow UI to build/
	$(BIN)/shopml pipeline compile -o build/lifecycle.yaml

serve: install ## Serve the latest trained model on 127.0.0.1:8080
	$(BIN)/shopml serve

bench-data: install ## Benchmark ingest -> clean -> store of 10 M synthetic events
	$(BIN)/python benchmarks/bench_data.py --events 10000000

bench-features: install services ## p50/p99 of one user's serving features from Redis, vs raw redis-py
	$(BIN)/python benchmarks/bench_features.py

bench-search: install ## p50/p99 of one search query over 100k items, through the server
	$(BIN)/python benchmarks/bench_search.py

bench-serve: install services ## Recommender load test on 127.0.0.1 (wrk, open-loop fixed rate): top-10 at 300 req/s, 10x overload, recovery
	$(BIN)/python benchmarks/bench_serve.py

bench-train: install ## Our SASRec vs RecBole's on the same MovieLens-100K split (RecBole in its own venv)
	$(BIN)/python benchmarks/bench_train.py

images: ## Build the component and serving images (needs a container engine)
	$(CONTAINER_TOOL) build -f images/Dockerfile.components --build-arg TORCH_VARIANT=$(TORCH_VARIANT) -t $(IMAGE_REGISTRY)/shopml:$(IMAGE_TAG) .
	$(CONTAINER_TOOL) build -f images/Dockerfile.serving -t $(IMAGE_REGISTRY)/shopml-serving:$(IMAGE_TAG) .

clean: ## Remove local state (.shopml) and build outputs; keeps .venv
	rm -rf .shopml build local_outputs .pytest_cache .mypy_cache .ruff_cache
