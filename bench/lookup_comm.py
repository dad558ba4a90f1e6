"""The Engram table lookups (all-to-all, routed, automatic) on fake CPU devices, as JSON lines.

For one table and a fixed batch per device, compiles the forward and backward of each lookup
(loss = sum of squares of the looked-up rows) on meshes of `--devices` data shards with the
table split by rows over all of them, and prints the bytes each device sends per step by kind
of collective (read from the compiled HLO, ring-algorithm estimate:
`engram_jax.sharding.hlo.Collective.traffic`), the compiler's temporary memory per device, and
the median step time, with time ratios against the all-to-all lookup measured in the same run.
Ids are drawn from a Zipf law over the table (`--zipf`, 0 for uniform), as n-gram ids are.

Usage: python bench/lookup_comm.py [--rows 1048576] [--width 64] [--batch-per-device 4]
       [--length 512] [--heads 16] [--devices 2,4,8] [--zipf 1.1] [--repeats 10]
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
from engram_jax.sharding import (BATCH_AXES, MESH_AXES, exchange_lookup,  # noqa: E402
                                 make_mesh, routed_lookup, use_mesh)


def zipf_ids(rng, rows: int, shape, exponent: float) -> np.ndarray:
    """int32 ids of `shape` over `rows`: uniform for exponent 0, else rank r drawn with
    probability proportional to r ** -exponent, ranks scattered over the rows."""
    if exponent == 0:
        return rng.integers(0, rows, shape, dtype=np.int32)
    weights = np.arange(1, rows + 1, dtype=np.float64) ** -exponent
    ranks = rng.choice(rows, size=shape, p=weights / weights.sum())
    return rng.permutation(rows).astype(np.int32)[ranks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1048576)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-per-device", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--devices", default="2,4,8")
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    lookups = {
        "all_to_all": lambda t, i: exchange_lookup(t, i, MESH_AXES, BATCH_AXES),
        "routed": lambda t, i: routed_lookup(t, i, MESH_AXES, BATCH_AXES),
        "auto": lambda t, i: jnp.take(t, i, axis=0),
    }
    rng = np.random.default_rng(0)
    table_host = rng.standard_normal((args.rows, args.width), np.float32)
    for devices in (int(n) for n in args.devices.split(",")):
        sharding = ShardingConfig(data=devices)
        mesh = make_mesh(sharding, jax.devices()[:devices])
        batch = args.batch_per_device * devices
        shape = (batch, args.length, args.heads)
        ids_host = zipf_ids(rng, args.rows, shape, args.zipf)
        setting = dict(devices=devices, mesh=f"data={devices}", table_rows=args.rows,
                       width=args.width, batch=batch, length=args.length, heads=args.heads,
                       zipf=args.zipf, distinct_ids=int(np.unique(ids_host).size),
                       output_mb_per_device=round(np.prod(shape) * args.width * 4 / devices
                                                  / 2**20, 2))
        times = {}
        with use_mesh(sharding, mesh):
            table = jax.device_put(table_host, NamedSharding(mesh, P(MESH_AXES, None)))
            ids = jax.device_put(ids_host, NamedSharding(mesh, P(BATCH_AXES)))
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
                moved = hlo.traffic_by_kind(compiled.as_text(), num_devices=devices)
                temp = compiled.memory_analysis().temp_size_in_bytes
                print(json.dumps(dict(
                    bench="lookup_comm", lookup=name, step_s=round(times[name], 5),
                    sent_mb_per_device=round(sum(moved.values()) / 2**20, 3),
                    by_kind_mb={k: round(v / 2**20, 3) for k, v in moved.items() if v},
                    temp_mb_per_device=round(temp / 2**20, 2), **setting)), flush=True)
        print(json.dumps(dict(bench="lookup_comm", what="step time / all_to_all step time",
                              routed=round(times["routed"] / times["all_to_all"], 3),
                              auto=round(times["auto"] / times["all_to_all"], 3), **setting)),
              flush=True)


if __name__ == "__main__":
    main()
