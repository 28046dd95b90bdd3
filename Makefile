# The two commands of the README: `make serve` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 3000
PROFILE ?= standard
# The model store lives with the project, not in the user's home; override to share one.
export BENTOML_HOME ?= $(CURDIR)/.bentoml
export BENTOML_DO_NOT_TRACK := true

.PHONY: serve models benchmark-models report test test-fast build image image-loadtest loadtest bench bench-text fuzz overload attack soak clean

# pip's output (and its warnings: a registry mirror's ignored locations printed ~200 lines on a
# fresh machine) goes to a log; its tail is shown only when the install fails.
INSTALL_LOG := artifacts/logs/install.log
$(BIN)/.installed: pyproject.toml
	@mkdir -p $(dir $(INSTALL_LOG))
	@echo "Installing the suite's dependencies into $(VENV) (a few minutes the first time; log: $(INSTALL_LOG))"
	@{ $(PYTHON) -m venv $(VENV) && $(BIN)/pip install --upgrade pip && $(BIN)/pip install -e '.[test]'; } \
		>$(INSTALL_LOG) 2>&1 || { tail -n 40 $(INSTALL_LOG); echo "install failed: see $(INSTALL_LOG)"; exit 1; }
	@touch $@

# Train -> export -> store whatever model is missing from the store (progress bars on stderr).
models: $(BIN)/.installed
	$(BIN)/python -m export all --build-missing --profile $(PROFILE)

# The benchmark models (issue 10): every family's benchmark profile trained on its public data set
# from ../shared/data (never committed here), exported and stored under its own name
# (generate-shakespeare, denoise-bsd, segment-camvid; sample-digits on the packaged digits);
# `make serve` then serves them beside the defaults. Each profile is sized to finish within 60
# minutes on 2 cores; docs/benchmarks.md has each one's measured time, and the whole target's:
# 1 h 24 min from a fresh clone, before the Train400 profile grew from 12 to 40 minutes.
BENCHMARK_DATA ?= $(CURDIR)/../shared/data
benchmark-models: $(BIN)/.installed
	$(BIN)/python -m export all --build-missing --profile benchmark --data $(BENCHMARK_DATA)

# The training report: curves, figures and the benchmark table in reports/training/README.md.
report: $(BIN)/.installed
	$(BIN)/python -m training report

# SUITE_HOST: the gRPC (9000) and probe (3001) ports bind the same address as HTTP.
serve: models
	SUITE_HOST=$(HOST) $(BIN)/bentoml serve --host $(HOST) --port $(PORT)

test: $(BIN)/.installed
	$(BIN)/python -m pytest

# The unit tests only (no trained model, no server): under a minute.
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -m unit -q

build: models
	$(BIN)/bentoml build

# The container image (podman, no Docker engine or registry needed; deploy/image/build.sh): the
# bento with its models, on a base made here from Debian's packages. A machine with a registry:
# make image BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
image: models
	BENTOML=$(BIN)/bentoml deploy/image/build.sh

# The load generator's image for the distributed load test in the cluster (deploy/loadtest).
image-loadtest: $(BIN)/.installed
	BENTOML=$(BIN)/bentoml deploy/image/build.sh loadtest

# A bounded headless load test against a running `make serve`: loadtest/profile.toml's users,
# duration and per-API objectives; exits 1 when an objective is missed; CSV and HTML in reports/.
loadtest: $(BIN)/.installed
	mkdir -p reports
	$(BIN)/locust --config loadtest/profile.toml --host http://$(HOST):$(PORT)

# The serving benchmark: the suite against a hand-written FastAPI server (needs wrk and h2load:
# apt-get install wrk nghttp2-client). Prints a table; took 8-11 minutes here.
$(BIN)/.bench-installed: $(BIN)/.installed
	@$(BIN)/pip install -e '.[test,bench]' >>$(INSTALL_LOG) 2>&1 || { tail -n 40 $(INSTALL_LOG); exit 1; }
	@touch $@

# CLASSIFIER: any stored image classifier (an imported one too) for the reference and classify rows.
CLASSIFIER ?= classify
bench: models $(BIN)/.bench-installed
	$(BIN)/python -m loadtest.bench_serving --classifier $(CLASSIFIER)

# The text generation benchmark: streams through /v1/completions against transformers generate()
# in process, same checkpoint (needs artifacts/generate from `make models`). Took about 2 minutes.
# BENCH_TEXT_ARGS: e.g. an imported model against the folder it came from:
# make bench-text BENCH_TEXT_ARGS="--models llama-30m --reference /tmp/llama-30m --vary --constrained --schema-requests 100"
BENCH_TEXT_ARGS ?=
bench-text: models
	$(BIN)/python -m loadtest.bench_text $(BENCH_TEXT_ARGS)

# Reliability scripts (issue 8); each starts the suite on free ports and prints its figures.
# schemathesis over every route + malformed gRPC ModelInfer; FUZZ_EXAMPLES per operation.
FUZZ_EXAMPLES ?= 5000
fuzz: models
	$(BIN)/python -m loadtest.fuzz --examples $(FUZZ_EXAMPLES) --grpc-requests 5000

# /classify at 4x its saturating concurrency: goodput, 503 share, /readyz latency (needs wrk).
overload: models
	$(BIN)/python -m loadtest.overload

# Every class of hostile or oversized input against a fresh server (two workers, the pod's 1536Mi
# memory limit): statuses, the process tree's peak RSS, probe latency; exits 1 on a missed goal.
attack: models
	$(BIN)/python -m loadtest.attack

# 10 minutes of the locustfile's mixed traffic, sampling each worker's RSS.
soak: models
	$(BIN)/python -m loadtest.soak --minutes 10

clean:
	rm -rf artifacts .bentoml
