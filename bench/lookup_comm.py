"""Routed vs automatic Engram table lookup on 8 fake CPU devices, as JSON lines.

For one table and batch, compiles the forward and backward of a lookup (loss = sum of squares of
the looked-up rows) both ways on a data=2 x fsdp=4 mesh with the table split by rows over all 8
devices, and prints the bytes each device sends per step by kind of collective (read from the
compiled HLO, ring-algorithm estimate: `engram_jax.sharding.hlo.Collective.traffic`) and the
median step
time of each, with their ratio measured in the same run.

Usage: python bench/lookup_comm.py [--rows 1048576] [--width 64] [--batch 32] [--length 512]
       [--heads 16] [--repeats 10]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from engram_jax.config import ShardingConfig  # noqa: E402
from engram_jax.sharding import hlo  # noqa: E402
from engram_jax.sharding import (BATCH_AXES, MESH_AXES, make_mesh, routed_lookup,  # noqa: E402
                                 use_mesh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1048576)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    sharding = ShardingConfig(data=2, fsdp=4)
    mesh = make_mesh(sharding)
    lookups = {
        "routed": lambda t, i: routed_lookup(t, i, MESH_AXES, BATCH_AXES),
        "auto": lambda t, i: jnp.take(t, i, axis=0),
    }
    rng = np.random.default_rng(0)
    setting = dict(devices=8, mesh="data=2,fsdp=4", table_rows=args.rows, width=args.width,
                   batch=args.batch, length=args.length, heads=args.heads,
                   table_mb=round(args.rows * args.width * 4 / 2**20, 2),
                   output_mb=round(args.batch * args.length * args.heads * args.width * 4 / 2**20,
                                   2))
    times = {}
    with use_mesh(sharding, mesh):
        table = jax.device_put(rng.standard_normal((args.rows, args.width), np.float32),
                               NamedSharding(mesh, P(MESH_AXES, None)))
        ids = jax.device_put(rng.integers(0, args.rows, (args.batch, args.length, args.heads),
                                          dtype=np.int32), NamedSharding(mesh, P(BATCH_AXES)))
        for name, lookup in lookups.items():
            step = jax.jit(jax.value_and_grad(lambda t, i, f=lookup: jnp.sum(f(t, i) ** 2)))
            compiled = step.lower(table, ids).compile()
            jax.block_until_ready(compiled(table, ids))
            samples = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(table, ids))
                samples.append(time.perf_counter() - start)
            times[name] = float(np.median(samples))
            moved = hlo.traffic_by_kind(compiled.as_text(), num_devices=8)
            print(json.dumps(dict(bench="lookup_comm", lookup=name, step_s=round(times[name], 5),
                                  sent_mb_per_device=round(sum(moved.values()) / 2**20, 2),
                                  by_kind_mb={k: round(v / 2**20, 2) for k, v in moved.items()
                                              if v},
                                  **setting)))
    print(json.dumps(dict(bench="lookup_comm", what="auto_time / routed_time",
                          ratio=round(times["auto"] / times["routed"], 3), **setting)))


if __name__ == "__main__":
    main()
