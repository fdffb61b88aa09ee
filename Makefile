# make demo   set everything up on a fresh machine, then run the demo
# make reproduce  every claim of kdops/train/claims.py over 5 seeds, then docs/reproductions.md (~25 min, 2 cores)
# make test   set everything up, then run the whole test suite
# make build  (re)build the extension in place; make bench: the benchmarks and benchmarks/RESULTS.md
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
STAMP_DEPS := $(VENV)/.deps-installed
STAMP_BUILD := build/.kdops-built
SOURCES := $(shell find csrc -type f) setup.py kdops/version.py

.PHONY: all setup build demo reproduce reproduce-rerun reproduce-quick test bench report clean compat gpu-check gpu-check-dry-run gpu-wheels

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel

$(STAMP_DEPS): requirements.txt | $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

setup: $(STAMP_DEPS)

$(STAMP_BUILD): $(STAMP_DEPS) $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	@mkdir -p build && touch $@

build: $(STAMP_BUILD)

demo: $(STAMP_BUILD)
	$(PY) -m kdops.train.demo

# make reproduce: each claim in turn (teachers and runs cached under REPRO_DIR/cache and reused by the next
# claim and the next call), then the page and its plots from every REPRO_DIR/<claim>/summary.json.
# make reproduce-quick: the smoke run of every claim (one seed, one epoch, no verdict; CI).
# make reproduce-rerun: every claim again on seeds 5-9 under REPRO_RERUN_DIR (same cache: the tuning runs and
# so the hyper-parameters are shared), then the page with its rerun section.
REPRO_DIR ?= runs/reproduce
REPRO_RERUN_DIR ?= runs/reproduce-b
REPRO_ARGS ?=
REPRO_REPORT = $(PY) -m kdops.train reproduce --report $(REPRO_DIR) --docs docs/reproductions.md \
	$$(test -d $(REPRO_RERUN_DIR) && echo --rerun $(REPRO_RERUN_DIR))
reproduce: $(STAMP_BUILD)
	@set -e; for c in $$($(PY) -m kdops.train reproduce --list | cut -d' ' -f1); do \
	    $(PY) -m kdops.train reproduce $$c --out $(REPRO_DIR)/$$c --cache $(REPRO_DIR)/cache $(REPRO_ARGS); done
	$(REPRO_REPORT)

reproduce-rerun: $(STAMP_BUILD)
	@set -e; for c in $$($(PY) -m kdops.train reproduce --list | cut -d' ' -f1); do \
	    $(PY) -m kdops.train reproduce $$c --seeds 5 6 7 8 9 --out $(REPRO_RERUN_DIR)/$$c \
	        --cache $(REPRO_DIR)/cache $(REPRO_ARGS); done
	$(REPRO_REPORT)

reproduce-quick: $(STAMP_BUILD)
	@set -e; for c in $$($(PY) -m kdops.train reproduce --list | cut -d' ' -f1); do \
	    $(PY) -m kdops.train reproduce $$c --quick --out $(REPRO_DIR)-quick/$$c --cache $(REPRO_DIR)-quick/cache; \
	done

test: $(STAMP_BUILD)
	$(PY) -m pytest python_tests -q

# make bench: every benchmark file (kdops vs eager vs torch.compile vs POT / GeomLoss, with floors and peak
# memory), then the report; make report: the report again from the last run's JSON.
BENCH_JSON ?= build/bench.json
BENCH_ARGS ?=
bench: $(STAMP_BUILD)
	@mkdir -p build
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=median,iqr,rounds -q \
	    --benchmark-json=$(BENCH_JSON) $(BENCH_ARGS)
	$(MAKE) --no-print-directory report

report:
	$(PY) -m benchmarks.report $(BENCH_JSON) --out benchmarks/RESULTS.md --plots benchmarks/plots

# make compat: CPU-only build and the loss library's tests against the oldest supported torch (2.11, Python 3.12)
compat: $(STAMP_DEPS)
	bash tools/compat.sh

# make gpu-check OUT=DIR [WHEELS=DIR]: the whole CUDA path on a GPU machine, at most 8 minutes (tools/gpu_check.py).
# It uses the python that has torch there (GPU_PYTHON, default python3), not this Makefile's venv.
GPU_PYTHON ?= python3
OUT ?= build/gpu-check
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py $(OUT) $(if $(WHEELS),--wheels $(WHEELS))

# make gpu-wheels: the wheels (CPython 3.12, x86-64) of what the GPU image lacks, into .gpu-wheels/ (about 34 MB,
# git-ignored), for WHEELS=.gpu-wheels on a machine without a network.
GPU_WHEELS := pot expecttest mnist1d geomloss liger-kernel
gpu-wheels: | $(PY)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .gpu-wheels $(GPU_WHEELS)

# The same script without a GPU (CI): build in place, the CPU subset, the sanitizer case list, the report.
gpu-check-dry-run: $(STAMP_BUILD)
	$(PY) tools/gpu_check.py $(OUT) --dry-run

clean:
	rm -rf build kdops/_C*.so .pytest_cache
