"""A few SGD steps of `tiny` (the trainer's own step) on a mesh, shared by the multi-host test
and its worker."""

import numpy as np
import optax
from flax import nnx

from engram_jax.data.compression import CompressedTokenizer
from engram_jax.config import load_model_config
from engram_jax.data.hashing import NgramHasher
from engram_jax.nn.model import Transformer
from engram_jax.config import ShardingConfig
from engram_jax.sharding import global_batch, make_mesh, use_mesh
from engram_jax.train.step import train_step

TINY = load_model_config("tiny")
GLOBAL_BATCH, LENGTH = 8, 16


def batch(step: int, rows: int = GLOBAL_BATCH) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The global batch of a step: tokens (rows, L + 1) and hash ids of tokens[:, :-1] (every
    process builds it and keeps its own rows)."""
    tokens = np.random.default_rng(step).integers(0, TINY.vocab_size,
                                                  (rows, LENGTH + 1)).astype(np.int32)
    hasher = NgramHasher(TINY.engram, CompressedTokenizer.identity(TINY.vocab_size))
    return tokens, hasher(tokens[:, :-1])


jitted_step = nnx.jit(train_step, static_argnums=(3,))


def run_steps(steps: int, process_id: int = 0, num_processes: int = 1,
              sharding: ShardingConfig | None = None) -> list[float]:
    """Losses of `steps` SGD steps; with `sharding`, on a mesh over all devices of all processes,
    each process feeding its consecutive share of every global batch."""
    def body():
        model = Transformer(TINY, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
        losses = []
        for step in range(steps):
            tokens, hash_ids = batch(step)
            if mesh is not None:
                rows = slice(process_id * GLOBAL_BATCH // num_processes,
                             (process_id + 1) * GLOBAL_BATCH // num_processes)
                tokens = global_batch(tokens[rows], mesh)
                hash_ids = {k: global_batch(v[rows], mesh) for k, v in hash_ids.items()}
            metrics = jitted_step(model, optimizer, {"tokens": tokens, "hash_ids": hash_ids}, 1)
            losses.append(float(metrics["loss"]))
        return losses

    if sharding is None and num_processes == 1:
        mesh = None
        return body()
    sharding = sharding or ShardingConfig(data=2, fsdp=-1)
    mesh = make_mesh(sharding)
    with use_mesh(sharding, mesh):
        return body()
