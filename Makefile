# optlayers: every set-up step lives here, so a fresh machine reproduces it.
#   make demo   - create .venv, install, run the main job on embedded data
#   make test   - create .venv, install, run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install peers test test-all lint format demo notebooks clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[dev]'
	# qpth 0.0.18 declares numpy<2 but works with numpy 2: the optional comparison peer.
	$(PY) -m pip install -qq --no-deps qpth==0.0.18
	# proxsuite's QPLayer, the other QP peer (binary wheel; cmeel is its loader).
	$(PY) -m pip install -qq --no-deps proxsuite==0.8.0 cmeel==0.62.0
	touch $(STAMP)

# Optional peers of tasks/bench_sort.py --race: diffsort, and torchsort built for the CPU (no nvcc
# on PATH while it compiles, or it builds CUDA kernels; a few minutes on 2 cores).
peers: install
	$(PY) -m pip install -qq --no-deps diffsort
	env PATH="$$(echo "$$PATH" | tr ':' '\n' | while read -r d; do [ -x "$$d/nvcc" ] || echo "$$d"; done | paste -sd:)" \
	  CUDA_HOME= MAX_JOBS=2 $(PY) -m pip install -qq --no-build-isolation --no-deps torchsort==0.1.10

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

# dKNN on the embedded mnist5k set, printed beside pixel kNN on the same split (a few minutes).
demo: install
	rm -rf results/demo-dknn
	$(PY) tasks/run_dknn.py --dataset mnist5k --num_epochs 15 --out results/demo-dknn

notebooks: install
	$(PY) tasks/notebooks.py --save

clean:
	rm -rf $(VENV) results .pytest_cache
