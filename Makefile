# `make demo` runs the main job; `make test` runs lint, types, the tests and the
# docstring examples under the Keras torch, TensorFlow and JAX backends (the pure
# PyTorch tests in the first pass only), then the CLI tests once more as users run the
# command (a new process each, KERAS_BACKEND unset). Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs docs-demo venv clean

venv: $(STAMP)

$(STAMP): requirements-dev.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bnkit demo --overwrite

# records the demo run the docs show (docs/demo/; the site draws its figures from it)
docs-demo: $(STAMP)
	rm -rf .docs-demo
	$(VENV)/bin/bnkit demo --skip-traps -o .docs-demo
	cp .docs-demo/demo.json .docs-demo/demo-torch.json docs/demo/
	rm -rf .docs-demo

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

lint: $(STAMP)
	$(PY) -m ruff check bnkit tests benchmarks examples docs/hooks.py
	$(PY) -m ruff format --check bnkit tests benchmarks examples docs/hooks.py
	$(PY) -m mypy bnkit

# one cache of pretrained digits models for the four passes, emptied first: its files carry
# the backend in their names, so a pass loads what an earlier one of its backend trained
CACHE := BNKIT_TEST_CACHE=$(CURDIR)/.test-cache

test: lint docs
	rm -rf .test-cache
	$(CACHE) KERAS_BACKEND=torch $(PY) -m pytest -q -n 2 tests bnkit --doctest-modules
	$(CACHE) KERAS_BACKEND=tensorflow $(PY) -m pytest -q -n 2 tests bnkit --doctest-modules
	$(CACHE) KERAS_BACKEND=jax $(PY) -m pytest -q -n 2 tests bnkit --doctest-modules
	$(CACHE) env -u KERAS_BACKEND BNKIT_TEST_CLI_PROCESS=1 $(PY) -m pytest -q -n 2 tests/test_cli.py

clean:
	rm -rf $(VENV) .test-cache .pytest_cache .mypy_cache .ruff_cache bnkit-demo site dist
