# make demo   set everything up on a fresh machine, then run the demo
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

.PHONY: all setup build demo test bench report clean

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

clean:
	rm -rf build kdops/_C*.so .pytest_cache
