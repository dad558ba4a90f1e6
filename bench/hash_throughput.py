"""Host hashing throughput for the reference demo's Engram config, as JSON lines.

Hashing runs in numpy on one thread, so tokens/s of this process is tokens/s per core.
Usage: python bench/hash_throughput.py [--batch 8] [--length 4096] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from engram_jax.config import EngramConfig
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.data.hashing import NgramHasher

DEEPSEEK_V3_VOCAB = 129280  # the demo's tokenizer; its compressed size is not needed for speed


def measure(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    config = EngramConfig()  # demo: 646400 per order, N=3, H=8, layers [1, 15]
    rng = np.random.default_rng(0)
    # A random many-to-one compression table of the demo tokenizer's size.
    lookup = rng.permutation(DEEPSEEK_V3_VOCAB) % int(DEEPSEEK_V3_VOCAB * 0.77)
    hasher = NgramHasher(config, CompressedTokenizer(lookup))
    tokens = rng.integers(0, DEEPSEEK_V3_VOCAB, size=(args.batch, args.length))
    n_tokens = tokens.size
    compressed = hasher.compressor(tokens)

    full = measure(lambda: hasher(tokens), args.repeats)
    one_layer = measure(lambda: hasher.hash_compressed(compressed, config.layer_ids[0]),
                        args.repeats)
    common = dict(batch=args.batch, length=args.length, layers=len(config.layer_ids),
                  heads_per_layer=config.num_heads, machine=platform.machine())
    print(json.dumps(dict(bench="hash_throughput", what="compress+hash all layers",
                          tokens_per_s_per_core=round(n_tokens / full), seconds=round(full, 5),
                          **common)))
    print(json.dumps(dict(bench="hash_throughput", what="hash one layer",
                          tokens_per_s_per_core=round(n_tokens / one_layer),
                          seconds=round(one_layer, 5), **common)))


if __name__ == "__main__":
    main()
