# Sluice — `make demo` and `make test` work from a fresh clone on Debian 12:
# they install what is missing (idempotently), build, and run.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CACHE ?= $(HOME)/.cache/sluice
# One target dir outside the clone, so CI's fresh clones reuse the build.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/sluice-target
VENV := $(CACHE)/venv
PY := $(VENV)/bin/python
MODELS := $(CACHE)/models
MODEL_STAMP := $(MODELS)/all-minilm-l6-v2/1/SHA256SUMS
TANSU := $(HOME)/.cargo/bin/tansu
BIN := $(CARGO_TARGET_DIR)/debug
RELEASE := $(CARGO_TARGET_DIR)/release
# `make install` puts sluice and sluice-load in $(PREFIX)/bin (rustup puts
# ~/.cargo/bin on the PATH).
PREFIX ?= $(HOME)/.cargo
SERVICES_DIR := $(CACHE)/test-services

export SLUICE_MODEL_REPO := $(MODELS)
export SLUICE_TEST_PYTHON := $(PY)
# Resolved when a recipe runs (the venv may not exist when make starts).
ORT_ENV = export ORT_DYLIB_PATH="$$(ls $(VENV)/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n1)"

APT_PACKAGES := build-essential pkg-config python3 python3-venv python3-pip redis-server postgresql postgresql-client curl ca-certificates kcat chromium prometheus
# `make image` and `make deploy-test` only: podman with runc, and debootstrap
# for the locally built Debian base (no image registry is needed).
IMAGE_APT_PACKAGES := podman buildah runc debootstrap binutils

.PHONY: image deploy-test image-deps bench bench-e2e bench-search load help install setup system-deps python-deps models tansu build demo test services-start services-stop lint fmt clean-cache

help:
	@echo "make install install what is missing, build release sluice and sluice-load into $(PREFIX)/bin"
	@echo "make demo    install what is missing, build, run Sluice embedded and push real jobs through it"
	@echo "make test    install what is missing, start Redis + tansu, run every test, stop them"
	@echo "make models  export the MiniLM model into $(MODELS)"
	@echo "make bench   batching benchmark: raw ONNX Runtime ceiling vs the engine"
	@echo "make bench-e2e  end-to-end throughput (release): Kafka -> sluice -> Redis vs the raw ONNX Runtime ceiling"
	@echo "make bench-search  recall@10 and latency of the approximate search index vs exact search (release)"
	@echo "make load    load scenarios (steady, capacity, spike, tenants) against sluice up; reports in $(LOAD_DIR)"
	@echo "make image   container image localhost/sluice (release build, ONNX Runtime, no compiler) and its -minilm variant"
	@echo "make deploy-test  the image as a deployment here (gateway, 2 workers, sink, notifier, Prometheus): kill a worker mid-load, check"
	@echo "make lint    rustfmt check + clippy"

## --- installation (idempotent) ---------------------------------------------

# $(call apt_install,PACKAGES,APT-GET FLAGS): installs those not installed yet.
define apt_install
	@missing=""; \
	for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(2) $$missing >/dev/null; \
	fi
endef

system-deps:
	$(call apt_install,$(APT_PACKAGES))
	@command -v cargo >/dev/null || { echo "cargo not found: install Rust 1.92+ (rustup)" >&2; exit 1; }

python-deps: system-deps
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -r workers/scripts/requirements.txt -r deploy/k8s/requirements.txt

models: python-deps $(MODEL_STAMP)

# MiniLM fp32 (version 1, the default) and int8 (version 2), plus two generic
# tensor models shipped in the onnxruntime wheel.
$(MODEL_STAMP): workers/scripts/export_minilm.py workers/scripts/import_onnx.py workers/scripts/repo_entry.py \
		workers/scripts/requirements.txt load-tests/data/sentences.tsv
	$(PY) workers/scripts/export_minilm.py --out $(MODELS) --int8-version 2
	datasets=$$($(PY) -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "datasets"))'); \
	$(PY) workers/scripts/import_onnx.py --onnx $$datasets/logreg_iris.onnx --out $(MODELS) --name logreg-iris --version 1 --outputs label; \
	$(PY) workers/scripts/import_onnx.py --onnx $$datasets/sigmoid.onnx --out $(MODELS) --name sigmoid --version 1 --outputs y
	touch $(MODEL_STAMP)

# Built once (about 17 minutes on 2 cores), then cached in ~/.cargo/bin.
tansu: $(TANSU)
$(TANSU):
	cargo install tansu --locked --features dynostore,libsql,postgres

setup: system-deps python-deps models

## --- build -----------------------------------------------------------------

build: system-deps
	cargo build --workspace --bins

## --- the two commands --------------------------------------------------------

# Release binaries on the PATH; they find ONNX Runtime and the models where
# `make setup` put them, so nothing needs exporting.
install: setup
	cargo build --release --bin sluice --bin sluice-load
	@install -d $(PREFIX)/bin
	@install -m 755 $(RELEASE)/sluice $(RELEASE)/sluice-load $(PREFIX)/bin/
	@echo "installed sluice and sluice-load in $(PREFIX)/bin"
	@case ":$$PATH:" in *":$(PREFIX)/bin:"*) ;; \
	  *) echo "NOTE: $(PREFIX)/bin is not on your PATH; add it (rustup's ~/.cargo/env does)";; esac

# The demo runs the release build, without ORT_DYLIB_PATH (found by itself).
demo: install
	$(RELEASE)/sluice-load demo --sluice $(RELEASE)/sluice --models $(MODELS)

# The pipeline's end-to-end tests run one at a time: each drives a whole
# Sluice (several, in the fault tests) against one shared broker on 2 cores.
# Every run starts from empty broker and Redis state (the tests' topics
# would otherwise pile up in tansu's SQLite file run after run and slow its
# fetches down). `make test TEST_ARGS=--nocapture` also prints what the tests measure
# (SIGKILL duplicates, backlog RSS, hot reload, canary share, spike, ...).
TEST_ARGS ?=
test: setup tansu install image-deps
	cargo build --workspace --bins --tests
	@$(ORT_ENV); \
	deploy/local/services.sh stop $(SERVICES_DIR); rm -rf $(SERVICES_DIR); \
	deploy/local/services.sh start $(SERVICES_DIR); \
	trap 'deploy/local/services.sh stop $(SERVICES_DIR)' EXIT; \
	source $(SERVICES_DIR)/env; \
	export SLUICE_BIN=$(BIN)/sluice; \
	status=0; \
	cargo test --workspace --no-fail-fast --exclude sluice-pipeline -- $(TEST_ARGS) || status=$$?; \
	cargo test -p sluice-pipeline --no-fail-fast -- --test-threads=1 $(TEST_ARGS) || status=$$?; \
	$(PY) deploy/k8s/check.py --sluice $(BIN)/sluice || status=$$?; \
	promtool check config deploy/prometheus/prometheus.yml || status=$$?; \
	promtool test rules deploy/prometheus/rules.test.yml || status=$$?; \
	$(RELEASE)/sluice-load bench --quick --sluice $(RELEASE)/sluice --models $(MODELS) --python $(PY) \
	  --redis $$SLUICE_TEST_REDIS --brokers $$SLUICE_TEST_BROKERS --services $(SERVICES_DIR) \
	  --out $(SERVICES_DIR)/bench-smoke.json || status=$$?; \
	$(RELEASE)/sluice-load search-bench --vectors 400 --queries 10 --min-recall 0.95 --sluice $(RELEASE)/sluice \
	  --models $(MODELS) --out $(SERVICES_DIR)/search-smoke.json || status=$$?; \
	env -u ORT_DYLIB_PATH -u SLUICE_MODEL_REPO $(PY) deploy/local/readme_quickstart.py README.md || status=$$?; \
	{ deploy/image/build.sh $(RELEASE)/sluice "$$ORT_DYLIB_PATH" $(MODELS) && \
	  $(PY) deploy/local/cluster.py test $(CACHE)/cluster; } || status=$$?; \
	exit $$status

## --- development -----------------------------------------------------------

# Batching benchmark (release build): raw ONNX Runtime ceiling vs the engine,
# length-aware vs arrival-order batching, one run, same inputs.
bench: setup
	@$(ORT_ENV); cargo bench -p sluice-workers --bench batching

# End-to-end throughput benchmark (release build): the raw ONNX Runtime
# ceiling, then Sluice end to end with the embedded broker and with tansu,
# for mixed and short texts and the trivial `sigmoid` model, with the CPU of
# every process; then the text model's versions (fp32 vs int8). Writes
# $(BENCH_DIR)/<time>.json and compares it with the previous run.
# `make bench-e2e BENCH_ARGS="--env SLUICE__WORKER__MAX_IN_FLIGHT=4096"` passes
# settings to the sluice processes.
BENCH_DIR := $(CACHE)/bench-e2e
BENCH_ARGS ?=
bench-e2e: setup tansu
	cargo build --release --bin sluice --bin sluice-load
	@$(ORT_ENV); mkdir -p $(BENCH_DIR); \
	dir=$(CACHE)/bench-services; deploy/local/services.sh stop $$dir; rm -rf $$dir; \
	PG_CLUSTERS=0 deploy/local/services.sh start $$dir; \
	trap "deploy/local/services.sh stop $$dir" EXIT; \
	source $$dir/env; \
	out=$(BENCH_DIR)/$$(date -u +%Y%m%dT%H%M%SZ).json; \
	prev=$$(ls $(BENCH_DIR)/*.json 2>/dev/null | tail -n1 || true); \
	$(RELEASE)/sluice-load bench --sluice $(RELEASE)/sluice --models $(MODELS) --python $(PY) \
	  --redis $$SLUICE_TEST_REDIS --brokers $$SLUICE_TEST_BROKERS --services $$dir \
	  --out $$out $${prev:+--baseline $$prev} $(BENCH_ARGS)

# Search benchmark (release build): 50,000 texts embedded through `sluice
# up`, then 100 query vectors searched exactly (a scan of the lake) and
# through the approximate index: recall@10 and p50/p99 latency of both.
# `make bench-search SEARCH_ARGS="--vectors 100000"` changes the sizes.
SEARCH_ARGS ?=
bench-search: setup
	cargo build --release --bin sluice --bin sluice-load
	@$(ORT_ENV); mkdir -p $(CACHE)/bench-search; \
	$(RELEASE)/sluice-load search-bench --sluice $(RELEASE)/sluice --models $(MODELS) \
	  --out $(CACHE)/bench-search/$$(date -u +%Y%m%dT%H%M%SZ).json $(SEARCH_ARGS)

# Load scenarios (release build), each against a `sluice up` it starts, about
# 8 minutes on 2 cores in all: capacity on short queries and on mixed
# paragraphs, a steady run with 1% poison records, a 10x spike, a noisy tenant
# next to a quiet one. Each writes report.json and report.html (plots) under
# $(LOAD_DIR)/<time>/<scenario>. `make load LOAD_ARGS="--via kafka"` adds
# arguments to every scenario. Then `faults` on services of its own, with
# the faults in LOAD_FAULTS: not the broker restart by default, because a
# restarted tansu 0.6 panics in its storage (README, "Load tests"); add
# broker-restart against a broker that survives one.
LOAD_DIR := $(CACHE)/load-reports
LOAD_ARGS ?=
LOAD_FAULTS ?= worker-kill,redis-stop,pg-stop
load: setup tansu
	cargo build --release --bin sluice --bin sluice-load
	@$(ORT_ENV); export SLUICE_BIN=$(RELEASE)/sluice; \
	dir=$(LOAD_DIR)/$$(date -u +%Y%m%dT%H%M%SZ); status=0; \
	L=$(RELEASE)/sluice-load; \
	$$L capacity --corpus short --start-rate 200 --factor 1.3 --step-secs 10 --p99-ms 2000 --out $$dir/capacity-short $(LOAD_ARGS) || status=$$?; \
	$$L capacity --corpus mixed --start-rate 30 --factor 1.3 --step-secs 10 --p99-ms 5000 --out $$dir/capacity-mixed $(LOAD_ARGS) || status=$$?; \
	$$L steady --corpus short --rate 300 --duration 60 --poison 0.01 --via kafka --out $$dir/steady $(LOAD_ARGS) || status=$$?; \
	$$L spike --corpus short --rate 100 --factor 10 --before-secs 15 --spike-secs 15 --after-secs 45 --out $$dir/spike $(LOAD_ARGS) || status=$$?; \
	$$L tenants --corpus short --limit 100 --quiet-rate 50 --noisy-rate 1000 --duration 30 --out $$dir/tenants $(LOAD_ARGS) || status=$$?; \
	sdir=$(CACHE)/load-services; deploy/local/services.sh stop $$sdir >/dev/null; rm -rf $$sdir; \
	if PG_CLUSTERS=1 deploy/local/services.sh start $$sdir >/dev/null; then \
	  $$L faults --services $$sdir --corpus short --rate 50 --faults $(LOAD_FAULTS) --out $$dir/faults $(LOAD_ARGS) || status=$$?; \
	else status=1; fi; \
	deploy/local/services.sh stop $$sdir >/dev/null; \
	echo "reports: $$dir/*/report.html"; exit $$status

## --- deployment ----------------------------------------------------------------

image-deps:
	$(call apt_install,$(IMAGE_APT_PACKAGES),--no-install-recommends)

# localhost/sluice:<version> (and :latest) and localhost/sluice:<version>-minilm,
# built with podman from deploy/image/Containerfile on a Debian 12 base made
# here by debootstrap (deploy/image/build.sh).
image: setup image-deps
	cargo build --release --bin sluice
	@$(ORT_ENV); deploy/image/build.sh $(RELEASE)/sluice "$$ORT_DYLIB_PATH" $(MODELS)

# The image as a deployment on this machine (deploy/local/cluster.py): tansu,
# Redis, two PostgreSQL shards, a gateway, two workers, a sink and a
# notifier in containers, Prometheus; a worker is SIGKILLed mid-load and
# another added; every job must finish once and land once in the lake and
# the shards, jobs' and a batch's callbacks must arrive signed, and every
# alert's metrics and dashboard panel must have data. About a minute
# once the image is built; `make test` runs it too.
deploy-test: image tansu
	$(PY) deploy/local/cluster.py test $(CACHE)/cluster

services-start: tansu
	deploy/local/services.sh start $(SERVICES_DIR)
	@echo "source $(SERVICES_DIR)/env"

services-stop:
	deploy/local/services.sh stop $(SERVICES_DIR)

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

clean-cache:
	rm -rf $(VENV) $(MODELS) $(SERVICES_DIR)
