# `make test` and `make train` set themselves up: a virtual environment in .venv with
# requirements.txt and this package installed (redone when either file changes).
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LIBTPU := $(VENV)/libtpu/.installed

.PHONY: test train libtpu aot bench experiments clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VPY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# libtpu for ahead-of-time TPU compiles (engram_jax.aot), in its own folder off the import path.
$(LIBTPU): $(STAMP) requirements-tpu-compile.txt
	$(VPY) -m pip install --quiet --disable-pip-version-check --upgrade \
		--target $(VENV)/libtpu -r requirements-tpu-compile.txt
	touch $(LIBTPU)

libtpu: $(LIBTPU)

# Test files run in parallel, one file per worker (its module fixtures are built once); a
# worker that crashes ends the run (a replaced one can leave xdist waiting).
test: $(STAMP) $(LIBTPU)
	$(VPY) -m pytest -q -n auto --dist loadfile --max-worker-restart=0 tests

train: $(STAMP)
	$(VPY) train.py --config configs/small.yaml

# The paper's Engram-27B step on a v5p-128 slice (64 chips), compiled ahead of time.
aot: $(LIBTPU)
	$(VPY) -m engram_jax.aot --config configs/paper_engram27b.yaml --topology v5p:4x4x4 \
		--batch 64 --seq-len 4096 --mesh fsdp=64 model.remat=full model.dtype=bfloat16

bench: $(STAMP)
	$(VPY) bench/hash_throughput.py

experiments: $(STAMP)
	$(VPY) -m engram_jax.experiments.iso_param --seeds 3
	$(VPY) -m engram_jax.experiments.allocation
	$(VPY) -m engram_jax.experiments.table_size
	$(VPY) -m engram_jax.experiments.ablations

clean:
	rm -rf $(VENV) .pytest_cache
