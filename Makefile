# optlayers: every set-up step lives here, so a fresh machine reproduces it.
#   make demo   - create .venv, install, run the main job on embedded data
#   make test   - create .venv, install, run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-all lint format demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# qpth 0.0.18 declares numpy<2 but works with numpy 2: the optional comparison peer.
	$(PY) -m pip install -q --no-deps qpth==0.0.18
	touch $(STAMP)

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -m "not slow"

test-all: install
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

demo: install
	$(PY) tasks/run_knn.py --dataset mnist5k

clean:
	rm -rf $(VENV) results .pytest_cache
