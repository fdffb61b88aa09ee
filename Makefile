# make demo   set everything up on a fresh machine, then run the demo
# make test   set everything up, then run the whole test suite
# make build  (re)build the extension in place; make bench: the benchmarks
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
STAMP_DEPS := $(VENV)/.deps-installed
STAMP_BUILD := build/.kdops-built
SOURCES := $(shell find csrc -type f) setup.py kdops/version.py

.PHONY: all setup build demo test bench clean

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
	$(PY) -m kdops.demo

test: $(STAMP_BUILD)
	$(PY) -m pytest python_tests -q

bench: $(STAMP_BUILD)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=median,iqr,rounds -q --benchmark-json=build/bench.json
	$(PY) -m benchmarks.report build/bench.json

clean:
	rm -rf build kdops/_C*.so .pytest_cache
