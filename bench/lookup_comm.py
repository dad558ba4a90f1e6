"""The Engram table lookups (all-to-all, routed, automatic) on fake CPU devices, as JSON lines.

For one table and a fixed batch per device, compiles the forward and backward of each lookup
(loss = sum of squares of the looked-up rows) on meshes of `--devices` data shards with the
table split by rows over all of them, and prints per mode and device count: the bytes each
device sends per step (`sent_mb_per_device`, from the compiled HLO's collectives with ring
costs, `engram_jax.sharding.hlo`), the compiler's temporary buffers per device
(`peak_buffer_mb`), the minimum a device must move (`minimum_mb_per_device`: the rows of its
distinct ids that other shards own, in and their gradients back, averaged over devices), and
the median step time with ratios against the all-to-all lookup measured in the same run. Ids
are drawn from a Zipf law over the table (`--zipf`; 0 for uniform). The automatic gather is
compiled up to `--auto-up-to` devices (it all-reduces the whole table gradient). The all-to-all
lookup runs with each of `--capacities`; its bytes count the rounds these ids need (`rounds`).

With `--corpus-config C`, first prints the de-duplication ratio (distinct rows / ids) of C's
real hash ids on the embedded corpus's training stream, for `--corpus-tokens` tokens per device
(prepares and caches the corpus and tokenizer as `make train` does).

Usage: python bench/lookup_comm.py [--rows 1048576] [--width 64] [--batch-per-device 1]
       [--length 512] [--heads 16] [--devices 8,16,32,64] [--zipf 1.1] [--repeats 5]
       [--auto-up-to 8] [--capacities 0.75] [--corpus-config small] [--corpus-tokens 4096]
"""

from __future__ import annotations

import argparse
import os
import sys


def _device_count(argv) -> int:
    for i, arg in enumerate(argv):
        if arg.startswith("--devices"):
            value = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            return max(int(n) for n in value.split(","))
    return 64


os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    f"--xla_force_host_platform_device_count="
                                    f"{_device_count(sys.argv)}"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from engram_jax.config import ShardingConfig, load_config  # noqa: E402
from engram_jax.sharding import hlo  # noqa: E402
from engram_jax.sharding import (BATCH_AXES, MESH_AXES, exchange_lookup,  # noqa: E402
                                 make_mesh, routed_lookup, use_mesh)
from engram_jax.sharding.lookup import round_capacity  # noqa: E402


def zipf_ids(rng, rows: int, shape, exponent: float) -> np.ndarray:
    """int32 ids of `shape` over `rows`: uniform for exponent 0, else rank r drawn with
    probability proportional to r ** -exponent, ranks scattered over the rows."""
    if exponent == 0:
        return rng.integers(0, rows, shape, dtype=np.int32)
    weights = np.arange(1, rows + 1, dtype=np.float64) ** -exponent
    ranks = rng.choice(rows, size=shape, p=weights / weights.sum())
    return rng.permutation(rows).astype(np.int32)[ranks]


def exchange_rounds(ids: np.ndarray, devices: int, rows: int, capacity_factor: float) -> int:
    """The rounds `exchange_lookup` runs on these ids (its own formula, on the host): the
    busiest (device, owner) pair's distinct ids over the ids per owner per round."""
    per_shard = rows // devices
    capacity = round_capacity(ids.size // devices, devices, capacity_factor)
    busiest = max(np.bincount(np.unique(shard) // per_shard, minlength=devices).max()
                  for shard in np.split(ids, devices))
    return max(1, -(-int(busiest) // capacity))


def minimum_bytes(ids: np.ndarray, devices: int, rows: int, width: int) -> float:
    """Mean over devices of the bytes a device must receive (rows) and send back (their
    gradients) for the distinct ids of its batch shard that other shards own."""
    per_shard = rows // devices
    remote = []
    for device, shard in enumerate(np.split(ids, devices)):
        distinct = np.unique(shard)
        remote.append(np.sum(distinct // per_shard != device))
    return 2 * float(np.mean(remote)) * width * 4


def corpus_dedup(config_name: str, tokens_per_device: int) -> dict:
    """Distinct global rows / ids of a config's hash ids on the embedded corpus, per device
    batch of `tokens_per_device` tokens (the mean over 8 such batches), per Engram layer."""
    from engram_jax.data.pipeline import make_hasher
    from engram_jax.data.prepare import prepare_data
    from engram_jax.table_layout import table_layout

    config = load_config(config_name)
    prepared = prepare_data(config.data, progress=False)
    hasher = make_hasher(config, prepared.tokenizer, prepared.eod_id)
    layout = table_layout(config.model.engram)
    ratios = {}
    seq_len = prepared.train.seq_len
    windows = -(-8 * tokens_per_device // seq_len)
    stream = prepared.train.read(range(windows))[:, :-1].reshape(-1)  # the split's first tokens
    for batch in range(8):
        start = batch * tokens_per_device
        tokens = stream[start:start + tokens_per_device][None]
        for layer, ids in hasher(tokens).items():
            rows = ids + np.asarray(layout[layer].offsets, np.int64)
            ratios.setdefault(layer, []).append(np.unique(rows).size / rows.size)
    return {str(layer): round(float(np.mean(r)), 4) for layer, r in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1048576)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-per-device", type=int, default=1)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--devices", default="8,16,32,64")
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--auto-up-to", type=int, default=8)
    parser.add_argument("--capacities", default="0.75",
                        help="engram.lookup_capacity values to run the all-to-all lookup with")
    parser.add_argument("--corpus-config")
    parser.add_argument("--corpus-tokens", type=int, default=4096)
    args = parser.parse_args()

    if args.corpus_config:
        print(json.dumps(dict(bench="lookup_comm", what="distinct rows / ids on the corpus",
                              config=args.corpus_config, tokens_per_device=args.corpus_tokens,
                              ratio_by_layer=corpus_dedup(args.corpus_config,
                                                          args.corpus_tokens))), flush=True)
    # (mode, capacity or None) -> the lookup; labels such as all_to_all@0.75 name the ratios.
    lookups = {("all_to_all", float(c)): (lambda t, i, c=float(c): exchange_lookup(
        t, i, MESH_AXES, BATCH_AXES, c)) for c in args.capacities.split(",")}
    lookups["routed", None] = lambda t, i: routed_lookup(t, i, MESH_AXES, BATCH_AXES)
    lookups["auto", None] = lambda t, i: jnp.take(t, i, axis=0)
    label = lambda mode, capacity: mode if capacity is None else f"{mode}@{capacity:g}"
    baseline = label(*next(iter(lookups)))
    rng = np.random.default_rng(0)
    table_host = rng.standard_normal((args.rows, args.width), np.float32)
    for devices in (int(n) for n in args.devices.split(",")):
        sharding = ShardingConfig(data=devices)
        mesh = make_mesh(sharding, jax.devices()[:devices])
        batch = args.batch_per_device * devices
        shape = (batch, args.length, args.heads)
        ids_host = zipf_ids(rng, args.rows, shape, args.zipf)
        minimum = minimum_bytes(ids_host, devices, args.rows, args.width)
        setting = dict(devices=devices, mesh=f"data={devices}", table_rows=args.rows,
                       width=args.width, batch=batch, length=args.length, heads=args.heads,
                       zipf=args.zipf, minimum_mb_per_device=round(minimum / 2**20, 3),
                       output_mb_per_device=round(np.prod(shape) * args.width * 4 / devices
                                                  / 2**20, 2))
        times = {}
        with use_mesh(sharding, mesh):
            table = jax.device_put(table_host, NamedSharding(mesh, P(MESH_AXES, None)))
            ids = jax.device_put(ids_host, NamedSharding(mesh, P(BATCH_AXES)))
            for (mode, capacity), lookup in lookups.items():
                if mode == "auto" and devices > args.auto_up_to:
                    continue
                name = label(mode, capacity)
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
                # The HLO counts one round of the exchange's run-time loop; the data decide how
                # many run.
                rounds = (1 if capacity is None else
                          exchange_rounds(ids_host, devices, args.rows, capacity))
                moved["all-to-all"] *= rounds
                sent = sum(moved.values())
                print(json.dumps(dict(
                    bench="lookup_comm", lookup=mode, capacity=capacity, rounds=rounds,
                    step_s=round(times[name], 5),
                    sent_mb_per_device=round(sent / 2**20, 3),
                    sent_over_minimum=round(sent / minimum, 2),
                    peak_buffer_mb=round(compiled.memory_analysis().temp_size_in_bytes / 2**20,
                                         2),
                    by_kind_mb={k: round(v / 2**20, 3) for k, v in moved.items() if v},
                    **setting)), flush=True)
        print(json.dumps(dict(bench="lookup_comm", what=f"step time / {baseline} step time",
                              **{name: round(t / times[baseline], 3)
                                 for name, t in times.items() if name != baseline},
                              **setting)), flush=True)


if __name__ == "__main__":
    main()
