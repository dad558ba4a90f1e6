"""Validation loss, perplexity and bits per byte of a model over batches of a split."""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import Mesh

from engram_jax.sharding.mesh import global_batch
from engram_jax.train.step import eval_sums


def to_device(batch: dict, mesh: Mesh | None) -> dict:
    """A host batch as global arrays, its batch dimension split over the mesh's batch axes."""
    return jax.tree.map(lambda x: global_batch(x, mesh), batch)


def evaluate(model: nnx.Module, batches, mesh: Mesh | None, count: int,
             bytes_per_token: float) -> dict:
    """Validation loss, perplexity and bits per byte over the first `count` of `batches`."""
    graphdef, state = nnx.split(model)
    total, tokens = 0.0, 0.0
    iterator = iter(batches)
    for _ in range(count):
        nll, n = eval_sums(graphdef, state, to_device(next(iterator), mesh))
        total, tokens = total + float(nll), tokens + float(n)
    loss = total / tokens
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)),
            "val_bits_per_byte": loss / math.log(2) / bytes_per_token}
