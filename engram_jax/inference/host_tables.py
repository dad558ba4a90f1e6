"""Engram tables held in host memory for decoding: the device keeps no table.

Hash ids depend only on tokens, so the rows a decoding step needs are known once the previous
token is chosen; `HostTables.gather` reads them from numpy arrays while the blocks before the
first Engram layer run on the device (`engram_jax.inference.decode`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.nn.model import Transformer, is_engram_table


class HostTables:
    """Every Engram layer's table as a numpy array, with its heads' offsets.

    Args:
      model: the model whose tables to copy to the host.
      tables: layer -> (R, head_dim) arrays to hold instead (tables that live on the host in
        training, `engram_jax.train.host_tables`); held as they are, not copied.
    """

    def __init__(self, model: Transformer, tables: dict[int, np.ndarray] | None = None):
        self.tables, self.offsets = {}, {}
        for layer, engram in model.engram_modules().items():
            self.tables[layer] = (np.asarray(jax.device_get(engram.table[...])) if tables is None
                                  else tables[layer])
            self.offsets[layer] = np.asarray(engram.layout.offsets, np.int64)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tables.values())

    def gather(self, hash_ids: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Layer -> (B, L, K * head_dim) rows for int32 hash ids (B, L, K) of each layer,
        heads in column order (as `nn.engram.lookup_embeddings`)."""
        return {layer: self.tables[layer][ids + self.offsets[layer]].reshape(*ids.shape[:-1], -1)
                for layer, ids in hash_ids.items()}


def state_without_tables(model: Transformer) -> tuple[nnx.GraphDef, nnx.State]:
    """The model split as (graphdef, state) with every Engram table replaced by an empty
    (0, head_dim) array: what the device holds when the tables live on the host."""
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    emptied = [(path, value.replace(jnp.zeros((0,) + value.shape[1:], value.dtype))
                if is_engram_table(path) else value) for path, value in flat]
    return graphdef, nnx.from_flat_state(emptied)
