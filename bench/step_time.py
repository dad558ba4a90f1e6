"""Training-step speed and memory, with and without Engram on the same backbone, as JSON lines.

Builds the config's model and the same model with `engram` removed, times full training steps
(forward, backward, optimiser, router-bias update) on random tokens with host-computed hash ids,
alternating the two models so both see the same machine load, and prints tokens/s, median step
time, peak memory and the ratio of the step times measured in this run.

Usage: python bench/step_time.py [--config configs/small.yaml] [--batch 16] [--seq-len 256]
       [--steps 10] [--dtype float32]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.config import Config, load_model_config
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.data.hashing import NgramHasher
from engram_jax.train.step import create_train_state, train_step


def peak_memory_bytes() -> tuple[int, str]:
    """Peak device memory where the backend reports it, else this process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    config = dataclasses.replace(load_model_config(args.config), dtype=args.dtype)
    if config.engram is None:
        raise SystemExit(f"{args.config} has no Engram layers to compare against")
    variants = {"engram": config, "no_engram": dataclasses.replace(config, engram=None)}
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (args.batch, args.seq_len + 1)).astype(np.int32)
    hasher = NgramHasher(config.engram, CompressedTokenizer.identity(config.vocab_size))
    batches = {"engram": {"tokens": jnp.asarray(tokens),
                          "hash_ids": {k: jnp.asarray(v)
                                       for k, v in hasher(tokens[:, :-1]).items()}},
               "no_engram": {"tokens": jnp.asarray(tokens), "hash_ids": {}}}
    step = nnx.jit(train_step, static_argnums=(3,), donate_argnums=(0, 1))
    states, compile_s = {}, {}
    for name, variant in variants.items():
        model, optimizer = create_train_state(Config(model=variant))
        start = time.perf_counter()
        jax.block_until_ready(step(model, optimizer, batches[name], 1))
        compile_s[name] = time.perf_counter() - start
        states[name] = (model, optimizer)
    times = {name: [] for name in variants}
    for _ in range(args.steps):
        for name in variants:
            model, optimizer = states[name]
            start = time.perf_counter()
            jax.block_until_ready(step(model, optimizer, batches[name], 1))
            times[name].append(time.perf_counter() - start)
    memory, memory_kind = peak_memory_bytes()
    device = jax.devices()[0].device_kind
    for name in variants:
        median = float(np.median(times[name]))
        print(json.dumps(dict(bench="step_time", model=name, config=args.config,
                              dtype=args.dtype, batch=args.batch, seq_len=args.seq_len,
                              step_s=round(median, 4),
                              tokens_per_s=round(args.batch * args.seq_len / median),
                              first_step_s=round(compile_s[name], 2), device=device)))
    ratio = float(np.median(times["engram"]) / np.median(times["no_engram"]))
    print(json.dumps(dict(bench="step_time", what="engram_step / no_engram_step",
                          ratio=round(ratio, 3), peak_memory_mb=round(memory / 2**20, 1),
                          memory=memory_kind, device=device, steps=args.steps)))


if __name__ == "__main__":
    main()
