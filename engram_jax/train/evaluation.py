"""Validation loss, perplexity and bits per byte of a model over batches of a split, and over
the validation splits of a data mixture's sources."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from engram_jax.sharding.mesh import global_batch
from engram_jax.train.step import eval_sums


def to_device(batch: dict, mesh: Mesh | None) -> dict:
    """A host batch as global arrays, its batch dimension split over the mesh's batch axes."""
    return jax.tree.map(lambda x: global_batch(x, mesh), batch)


def evaluate(model: nnx.Module, batches, mesh: Mesh | None, count: int,
             byte_lengths: np.ndarray, host_tables=None) -> dict:
    """Validation loss, perplexity and bits per byte over the first `count` of `batches`.

    Bits per byte divide the sample's summed loss by the sample's own text bytes
    (`byte_lengths`: int (V,) bytes per token, `TextTokenizer.token_byte_lengths`). With
    host-resident tables, `host_tables` (a `HostTableOptimizer`) gives each batch's rows."""
    graphdef, state = nnx.split(model)
    lengths = jnp.asarray(byte_lengths, jnp.int32)
    total, tokens, text_bytes = 0.0, 0.0, 0
    iterator = iter(batches)
    for _ in range(count):
        batch = next(iterator)
        if host_tables is not None:
            batch = {**batch, "rows": host_tables.gather(batch["hash_ids"])}
        nll, n, b = eval_sums(graphdef, state, to_device(batch, mesh), lengths)
        total, tokens, text_bytes = total + float(nll), tokens + float(n), text_bytes + int(b)
    loss = total / tokens
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)),
            "val_bits_per_byte": total / math.log(2) / max(text_bytes, 1)}


def evaluate_sources(model: nnx.Module, sources: Sequence[tuple[str, float, Iterable, int]],
                     mesh: Mesh | None, byte_lengths: np.ndarray, host_tables=None) -> dict:
    """`evaluate` on each source's validation batches, given as (name, weight, batches, count):
    a lone source's (name "") figures, or a mixture's per source (`val_loss/<name>`, ...) with
    `val_loss` and `val_bits_per_byte` their means weighted as training draws the sources and
    `val_perplexity` the exponential of that loss."""
    results = {name: evaluate(model, batches, mesh, count, byte_lengths, host_tables)
               for name, _, batches, count in sources}
    if len(sources) == 1 and sources[0][0] == "":
        return results[""]
    total = sum(weight for _, weight, _, _ in sources)
    merged = {f"{key}/{name}": value for name, result in results.items()
              for key, value in result.items()}
    for key in ("val_loss", "val_bits_per_byte"):
        merged[key] = sum(weight / total * results[name][key]
                          for name, weight, _, _ in sources)
    merged["val_perplexity"] = math.exp(min(merged["val_loss"], 700.0))
    return merged
