"""Memory and step time of training as the Engram tables grow, dense Adam against row-sparse Adam.

For each table scale (the config's `engram.vocab_size_per_ngram` times 1, 10, 100) and each
`train.table_optimizer`, a fresh process builds the trainer's state, runs the trainer's
compiled step on random tokens with host-computed hash ids, and prints one JSON line:
`placement` (where the tables live: "device"; host-resident tables are not built yet),
`table_scale`, `table_optimizer`, `table_mb` (the tables' own bytes), `device_memory_mb` (bytes
of live device buffers after the steps: parameters, optimiser state, batch), `peak_rss_mb` (the
process's peak resident memory, compiles included) and `step_s` (median step time). On a CPU
the device's buffers are host memory too, so both memory figures count them.

Usage: python bench/table_memory.py [--config configs/small.yaml] [--scales 1 10 100]
       [--optimizers adam sparse_adam] [--steps 6]
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


def measure(config_path: str, scale: int, table_optimizer: str, steps: int) -> dict:
    """One configuration's figures, in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from engram_jax.config import load_config
    from engram_jax.data.compression import CompressedTokenizer
    from engram_jax.data.hashing import NgramHasher
    from engram_jax.train.step import create_train_state, jitted_train_step

    config = load_config(config_path)
    engram = config.model.engram
    engram = dataclasses.replace(engram, vocab_size_per_ngram=tuple(
        v * scale for v in engram.vocab_size_per_ngram))
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, engram=engram),
        train=dataclasses.replace(config.train, table_optimizer=table_optimizer))
    model, optimizer = create_train_state(config)
    table_bytes = sum(e.table[...].nbytes for e in model.engram_modules().values())
    rng = np.random.default_rng(0)
    batch_size, length = config.train.batch_size, config.data.seq_len
    hasher = NgramHasher(engram, CompressedTokenizer.identity(config.model.vocab_size))
    times = []
    for step in range(steps + 1):  # the first compiles
        tokens = rng.integers(0, config.model.vocab_size, (batch_size, length + 1))
        batch = {"tokens": jnp.asarray(tokens, jnp.int32),
                 "hash_ids": {k: jnp.asarray(v) for k, v in hasher(tokens[:, :-1]).items()}}
        start = time.perf_counter()
        jax.block_until_ready(jitted_train_step(model, optimizer, batch, 1))
        if step:
            times.append(time.perf_counter() - start)
    live = sum(a.nbytes for a in jax.live_arrays())
    return {"bench": "table_memory", "placement": "device", "table_scale": scale,
            "table_optimizer": table_optimizer, "config": config_path,
            "table_mb": round(table_bytes / 2**20, 1),
            "device_memory_mb": round(live / 2**20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                 * RSS_UNIT / 2**20, 1),
            "step_s": round(float(np.median(times)), 4), "steps": steps,
            "backend": jax.default_backend()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--optimizers", nargs="+", default=["adam", "sparse_adam"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--one", nargs=2, metavar=("SCALE", "OPTIMIZER"),
                        help=argparse.SUPPRESS)  # the child process's configuration
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.config, int(args.one[0]), args.one[1], args.steps)),
              flush=True)
        return
    for scale in args.scales:
        for name in args.optimizers:
            child = subprocess.run(
                [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                 "--one", str(scale), name], capture_output=True, text=True, check=False)
            lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
            if child.returncode or not lines:
                print(json.dumps({"bench": "table_memory", "table_scale": scale,
                                  "table_optimizer": name, "failed": child.stderr[-500:]}),
                      flush=True)
            else:
                print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
