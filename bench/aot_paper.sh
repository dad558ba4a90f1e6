#!/usr/bin/env bash
# The paper's 27B models compiled ahead of time for a v5p-128 slice (64 chips; README, "Pod
# scale"): one JSON line per configuration from `python -m engram_jax.aot` (libtpu: `make
# libtpu`). Full remat, bf16 compute, a global batch of 64 x 4096 tokens (one sequence per chip).
#   bench/aot_paper.sh > aot_paper.jsonl
# More topologies: TOPOLOGY=v5e:16x16 BATCH=256 MESHES="fsdp=256" bench/aot_paper.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TOPOLOGY=${TOPOLOGY:-v5p:4x4x4}
BATCH=${BATCH:-64}
read -r -a MESHES <<< "${MESHES:-fsdp=64 fsdp=8,expert=8}"
run() {
  "$PY" -m engram_jax.aot "$@" --topology "$TOPOLOGY" --batch "$BATCH" --seq-len 4096 \
    model.remat=full model.dtype=bfloat16 || echo "{\"failed\": \"$*\"}"
}
run --config paper_engram27b --mesh "${MESHES[0]}"
for mesh in "${MESHES[@]}"; do
  run --config paper_moe27b --mesh "$mesh"
done
