# `make test` and `make train` set themselves up: a virtual environment in .venv with
# requirements.txt and this package installed (redone when either file changes).
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test train bench experiments clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VPY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# Test files run in parallel, one file per worker (its module fixtures are built once).
test: $(STAMP)
	$(VPY) -m pytest -q -n auto --dist loadfile tests

train: $(STAMP)
	$(VPY) train.py --config configs/small.yaml

bench: $(STAMP)
	$(VPY) bench/hash_throughput.py

experiments: $(STAMP)
	$(VPY) -m engram_jax.experiments.iso_param --seeds 3
	$(VPY) -m engram_jax.experiments.allocation
	$(VPY) -m engram_jax.experiments.table_size
	$(VPY) -m engram_jax.experiments.ablations

clean:
	rm -rf $(VENV) .pytest_cache
