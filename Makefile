# The two commands of the README: `make demo` (the main job) and `make test` (the whole suite);
# `make tutorials` rebuilds the tutorials' executed notebooks.
# All three work on a fresh machine with Python >= 3.11, make and the package registries.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test lint tutorials install clean

install: $(STAMP)

# torch first, pinned, so pip takes the CPU build from local disk and never pulls a CUDA build
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m reference.compare --threads 1
	$(PY) -m reference.pipeline.demo

# ruff first (the lint is part of the suite), then every test, spread over the cores (test by
# test, except an xdist_group, which one worker runs whole: tests/conftest.py)
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n auto --dist loadgroup

lint: $(STAMP)
	$(PY) -m ruff check .

# execute every tutorial (tutorials/NN_*.py) and write its notebook beside it, outputs included;
# IMDB_PATH names the archive (tutorials 4-6 use real reviews; without it they say so)
tutorials: $(STAMP)
	$(PY) tutorials/render.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
