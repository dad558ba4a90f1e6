"""A few SGD steps of `tiny` (the trainer's own step) on a mesh, the meshes of the equality
tests and the Engram lookup's test cases; shared by the sharding and lookup tests, the
multi-host tests and their worker."""

import jax
import jax.numpy as jnp
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
# The meshes of the equality tests, over 8 devices.
MESHES = {
    "data8": ShardingConfig(data=8),
    "data2_fsdp4": ShardingConfig(data=2, fsdp=4),
    "data2_fsdp2_expert2": ShardingConfig(data=2, fsdp=2, expert=2),
    "data2_fsdp2_tensor2": ShardingConfig(data=2, fsdp=2, tensor=2),
    "data2_expert4": ShardingConfig(data=2, expert=4),  # one of tiny's 4 experts per device
}


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


ROWS, WIDTH, SHAPE = 1024, 8, (8, 16, 4)  # table (R, W); ids (B, L, heads): 512 ids


def id_batch(kind: str, seed: int = 0) -> np.ndarray:
    """int32 ids of SHAPE: "spread" (uniform over the table), "one_shard" (every id in the first
    eighth of the rows: owned by one shard of 8, with repeats), "duplicates" (three distinct
    ids), "distinct" (no id twice)."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(SHAPE))
    ids = {"spread": lambda: rng.integers(0, ROWS, size),
           "one_shard": lambda: rng.integers(0, ROWS // 8, size),
           "duplicates": lambda: rng.choice([3, 700, 1000], size),
           "distinct": lambda: rng.permutation(ROWS)[:size]}[kind]()
    return ids.reshape(SHAPE).astype(np.int32)


def table_and_cotangent() -> tuple[np.ndarray, np.ndarray]:
    """A float32 table (ROWS, WIDTH) and a cotangent for looked-up rows of SHAPE."""
    rng = np.random.default_rng(1)
    return (rng.standard_normal((ROWS, WIDTH)).astype(np.float32),
            rng.standard_normal(SHAPE + (WIDTH,)).astype(np.float32))


def lookup_reference(table: np.ndarray, ids: np.ndarray, cotangent: np.ndarray):
    """One device's table[ids] and table gradient of sum(table[ids] * cotangent)."""
    grad = jax.grad(lambda t: jnp.sum(jnp.take(t, ids, axis=0) * cotangent))(table)
    return table[ids], np.asarray(grad)
