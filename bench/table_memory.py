"""Memory and step time of training as the Engram tables grow: dense Adam and row-sparse Adam with
the tables on the device, and row-sparse Adam with the tables in host memory.

For each table scale (the config's `engram.vocab_size_per_ngram` times 1, 10, 100) and each
configuration, a fresh process builds the trainer's state, runs the trainer's compiled step on
random tokens with host-computed hash ids and prints one JSON line: `placement`
(`engram.table_placement`), `table_scale`, `table_optimizer`, `table_mb` (the tables' own
bytes), `host_tables_mb` (host tables with their moments; 0 on the device), `device_memory_mb`
(bytes of live device buffers after the steps: parameters, optimiser state, batch),
`step_peak_mb` (the compiled step's peak as its `memory_analysis` plans it: arguments, outputs
not aliased to them, temporaries),
`peak_rss_mb` (the process's peak resident memory, compiles included) and `step_s` (median
time of one training step; with host tables as the trainer runs it: the device step, the next
batch's rows gathered meanwhile, the host's lazy Adam and the patch). On a CPU the device's
buffers are host memory too, so `peak_rss_mb` counts both.

Usage: python bench/table_memory.py [--config configs/small.yaml] [--scales 1 10 100]
       [--runs device:adam device:sparse_adam host:sparse_adam] [--steps 6]

The Engram layer alone at the reference demo's shape (a one-block model around it):
       python bench/table_memory.py --config bench/engram_demo_layer.yaml --scales 1 --steps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time

RSS_UNIT = 1024  # ru_maxrss is in KiB on Linux
RUNS = ("device:adam", "device:sparse_adam", "host:sparse_adam")


def measure(config_path: str, scale: int, placement: str, table_optimizer: str,
            steps: int) -> dict:
    """One configuration's figures, in this process."""
    import grain
    import jax
    import numpy as np

    from engram_jax.config import load_config
    from engram_jax.data.compression import CompressedTokenizer
    from engram_jax.data.hashing import NgramHasher
    from engram_jax.train.host_tables import HostRowFeed, HostTableOptimizer
    from engram_jax.train.step import create_train_state, jitted_train_step

    config = load_config(config_path)
    engram = config.model.engram
    engram = dataclasses.replace(engram, table_placement=placement, vocab_size_per_ngram=tuple(
        v * scale for v in engram.vocab_size_per_ngram))
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, engram=engram),
        train=dataclasses.replace(config.train, table_optimizer=table_optimizer))
    model, optimizer = create_train_state(config)
    batch_size, length = config.train.batch_size, config.data.seq_len
    hasher = NgramHasher(engram, CompressedTokenizer.identity(config.model.vocab_size))

    def random_batch(seed: int) -> dict:
        tokens = np.random.default_rng(seed).integers(0, config.model.vocab_size,
                                                      (batch_size, length + 1))
        return {"tokens": tokens.astype(np.int32), "hash_ids": hasher(tokens[:, :-1])}

    batches = iter(grain.MapDataset.range(steps + 2).map(random_batch).to_iter_dataset())
    tables = None
    if placement == "host":
        tables = HostTableOptimizer(model, config.train)
        batches = HostRowFeed(batches, tables)
        table_bytes = tables.tables.nbytes
    else:
        table_bytes = sum(e.table[...].nbytes for e in model.engram_modules().values())
    times = []
    for step in range(steps + 1):  # the first compiles
        batch = next(batches)
        start = time.perf_counter()
        metrics = jitted_train_step(model, optimizer, jax.device_put(batch), 1)
        if tables is not None:
            table_step = metrics.pop("host_table_step")
            batches.read_ahead()
            batches.patch(tables.apply(table_step))
        jax.block_until_ready(metrics)
        if step:
            times.append(time.perf_counter() - start)
    live = sum(a.nbytes for a in jax.live_arrays())
    memory = jitted_train_step.lower(model, optimizer, jax.device_put(batch),
                                     1).compile().memory_analysis()
    step_peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                 - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    return {"bench": "table_memory", "placement": placement, "table_scale": scale,
            "table_optimizer": table_optimizer, "config": config_path,
            "table_mb": round(table_bytes / 2**20, 1),
            "host_tables_mb": round(tables.nbytes / 2**20, 1) if tables is not None else 0.0,
            "device_memory_mb": round(live / 2**20, 1),
            "step_peak_mb": round(step_peak / 2**20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                 * RSS_UNIT / 2**20, 1),
            "step_s": round(float(np.median(times)), 4), "steps": steps,
            "backend": jax.default_backend()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS,
                        help="placement:table_optimizer pairs")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--one", nargs=2, metavar=("SCALE", "RUN"),
                        help=argparse.SUPPRESS)  # the child process's configuration
    args = parser.parse_args()
    if args.one:
        placement, table_optimizer = args.one[1].split(":")
        print(json.dumps(measure(args.config, int(args.one[0]), placement, table_optimizer,
                                 args.steps)), flush=True)
        return
    for scale in args.scales:
        for run in args.runs:
            child = subprocess.run(
                [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                 "--one", str(scale), run], capture_output=True, text=True, check=False)
            lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
            if child.returncode or not lines:
                placement, table_optimizer = run.split(":")
                print(json.dumps({"bench": "table_memory", "table_scale": scale,
                                  "placement": placement, "table_optimizer": table_optimizer,
                                  "failed": child.stderr[-500:]}), flush=True)
            else:
                print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
