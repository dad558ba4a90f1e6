#!/usr/bin/env bash
# The paper's 27B models compiled ahead of time for TPU pods (README, "Pod scale"): one JSON line
# per configuration from `python -m engram_jax.aot` (libtpu: `make libtpu`). Full remat, bf16
# compute, 4,096-token sequences, a global batch of one sequence per chip.
#   bench/aot_paper.sh > aot_paper.jsonl
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
common=(--seq-len 4096 model.remat=full model.dtype=bfloat16)
run() { "$PY" -m engram_jax.aot "$@" "${common[@]}" || echo "{\"failed\": \"$*\"}"; }
run --config paper_engram27b --topology v5p:4x4x4 --batch 64 --mesh fsdp=64
run --config paper_moe27b --topology v5p:4x4x4 --batch 64 --mesh fsdp=64
run --config paper_moe27b --topology v5p:4x4x4 --batch 64 --mesh fsdp=8,expert=8
run --config paper_engram27b --topology v5e:16x16 --batch 256 --mesh fsdp=256
run --config paper_moe27b --topology v5e:16x16 --batch 256 --mesh fsdp=256
