"""Attention's own memory on one TPU chip, per kernel, compiled ahead of time (no TPU needed).

Compiles the forward and backward of `engram_jax.nn.attention.causal_attention` for one chip
of a v5p topology with libtpu's compiler (`make libtpu`), at the paper models' attention shape
(32 heads of width 96, bf16) and one sequence per chip as in `bench/aot_paper.sh`, and prints
one JSON line per kernel and length: the compiler's temporary memory (`temp_gib`) and the
ratio of XLA's to splash's, measured in the same run.

Usage: python bench/attention_memory.py [--lengths 4096,8192] [--heads 32] [--head-dim 96]
       [--batch 1]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from engram_jax import aot
from engram_jax.nn.attention import causal_attention

GIB = 1024**3


def temp_gib(kernel: str, batch: int, length: int, heads: int, head_dim: int, device) -> float:
    spec = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16,
                                sharding=SingleDeviceSharding(device))
    loss = lambda q, k, v: jnp.sum(causal_attention(q, k, v, None, kernel).astype(jnp.float32))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    return compiled.memory_analysis().temp_size_in_bytes / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=96)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    device = aot.topology_devices("v5p:2x2x1")[0]
    for length in (int(n) for n in args.lengths.split(",")):
        temps = {kernel: temp_gib(kernel, args.batch, length, args.heads, args.head_dim, device)
                 for kernel in ("xla", "splash")}
        for kernel, temp in temps.items():
            print(json.dumps(dict(bench="attention_memory", kernel=kernel, device="TPU v5p",
                                  batch=args.batch, length=length, heads=args.heads,
                                  head_dim=args.head_dim, temp_gib=round(temp, 4))), flush=True)
        print(json.dumps(dict(bench="attention_memory", what="xla temp / splash temp",
                              length=length, ratio=round(temps["xla"] / temps["splash"], 2))),
              flush=True)


if __name__ == "__main__":
    main()
