# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench docs clean

setup: $(STAMP)

# torch==2.13.0 first: on these machines it is a local CPU build (any other
# version would pull gigabytes); the package's own `torch>=2.1` then installs nothing more.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bnlab verify
	$(VENV)/bin/bnlab reproduce figure1
	$(VENV)/bin/bnlab reproduce paper --preset quick

# The whole suite, the docs build with warnings as errors included (tests/test_docs.py).
test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(VENV)/bin/bnlab bench

# The documentation site (Sphinx): API reference from the docstrings, the tour, the
# experiments and the results. Warnings are errors, as in `make test`.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html
	@echo "open docs/_build/html/index.html"

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache docs/_build docs/_generated
