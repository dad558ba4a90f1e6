"""Engram tables in host memory for training (`engram.table_placement: host`).

The device holds no table: the model's tables are (0, head_dim) and its Engram modules read the
rows each batch carries. Per step (docs/ARCHITECTURE.md, "Host-resident tables"):

1. `HostRowFeed` hands the loop a batch with "rows": {layer: (B, L, E)}, gathered from the
   host tables by the batch's hash ids (which the input pipeline computed on the host).
2. The device step differentiates the loss with respect to those rows and returns, per layer,
   the table rows of the batch's hash ids and their clipped gradients, split over the devices
   as the batch is (`SparseTableOptimizer.update`), with the step's learning rate and count.
3. While the device runs, the feed reads the next batch and gathers its rows from the tables as
   they are; then `HostTableOptimizer.apply` runs lazy Adam on the touched rows (the same
   `_adam` as the device's `sparse_adam`, on the host's CPU) and the feed patches the next
   batch's rows that the update changed. So every step sees the tables after every earlier
   step, as with device tables: training is the same as `sparse_adam` with device tables.

Checkpoints hold the tables and both moments (`HostTableOptimizer.state`); the feed's iterator
state is the one before its read-ahead batch, so a restored run reads that batch again.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.config.schema import TrainConfig
from engram_jax.inference.host_tables import HostTables
from engram_jax.nn.engram import init_table
from engram_jax.nn.model import Transformer, is_engram_table
from engram_jax.train.optimizer import ADAM_EPS
from engram_jax.train.sparse_adam import _adam, unique_row_sums


def host_placement(model_config) -> bool:
    """Whether a model config keeps its Engram tables on the host."""
    return model_config.engram is not None and model_config.engram.table_placement == "host"


@functools.cache
def _cpu() -> jax.Device:
    return jax.devices("cpu")[0]


_host_adam = jax.jit(_adam, static_argnames=("b1", "b2", "eps"))
_host_row_sums = jax.jit(unique_row_sums, static_argnames="num_rows")


class HostTableOptimizer:
    """The host tables of a model with `engram.table_placement: host` and their lazy Adam
    moments, all numpy: `tables` (a `HostTables`: layer -> (R, head_dim) in the parameter
    dtype), `mu` and `nu` (layer -> (R, head_dim) float32).

    Args:
      model: the model (its Engram modules hold the tables' keys, `nn.engram.TableKey`); the
        tables are drawn from them on the host's CPU, so they start as device tables would.
      train: `b1` and `b2` of the tables' Adam.
    """

    def __init__(self, model: Transformer, train: TrainConfig):
        self.b1, self.b2, self.eps = train.b1, train.b2, ADAM_EPS
        drawn = {}
        with jax.default_device(_cpu()):
            for layer, engram in model.engram_modules().items():
                key = jax.random.wrap_key_data(jnp.asarray(jax.device_get(engram.table_key[...])))
                shape = (engram.layout.padded_rows, engram.config.head_dim)
                drawn[layer] = np.array(init_table(key, shape, engram.table.dtype))
        self.tables = HostTables(model, drawn)
        self.mu = {layer: np.zeros(t.shape, np.float32) for layer, t in drawn.items()}
        self.nu = {layer: np.zeros(t.shape, np.float32) for layer, t in drawn.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of the tables and their moments."""
        return self.tables.nbytes + sum(m.nbytes for m in (*self.mu.values(),
                                                           *self.nu.values()))

    def gather(self, hash_ids: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Layer -> (B, L, E) rows of int32 hash ids (B, L, K) (`HostTables.gather`)."""
        return self.tables.gather(hash_ids)

    def apply(self, table_step: dict) -> dict[int, np.ndarray]:
        """Lazy Adam on the rows a device step touched, in place.

        Args:
          table_step: the step's "host_table_step" metric (`SparseTableOptimizer.update`):
            learning rate, count and per layer the rows of the batch's hash ids and their
            clipped gradients, summed here per distinct row (`unique_row_sums`).

        Returns:
          layer -> int (T,) the rows it changed.
        """
        table_step = jax.device_get(table_step)
        changed = {}
        hyper = dict(b1=self.b1, b2=self.b2, eps=self.eps)
        with jax.default_device(_cpu()):
            for key, ids in table_step["rows"].items():
                layer = int(key)
                table, mu, nu = self.tables.tables[layer], self.mu[layer], self.nu[layer]
                rows, sums = _host_row_sums(ids.reshape(-1),
                                            table_step["grads"][key].reshape(ids.size, -1),
                                            table.shape[0])
                rows = np.asarray(rows)
                valid = rows < table.shape[0]
                take = np.minimum(rows, table.shape[0] - 1)  # padding: computed, then dropped
                values, m, v = _host_adam(table[take], mu[take], nu[take], sums,
                                          table_step["count"], table_step["learning_rate"],
                                          **hyper)
                touched = rows[valid]
                table[touched] = np.asarray(values)[valid].astype(table.dtype)
                mu[touched], nu[touched] = np.asarray(m)[valid], np.asarray(v)[valid]
                changed[layer] = touched
        return changed

    def patch(self, batch: dict, changed: dict[int, np.ndarray]) -> None:
        """Re-reads the rows of `batch` ("hash_ids" and the "rows" gathered from them) that an
        update (`apply`'s result) changed since they were gathered."""
        for layer, ids in batch["hash_ids"].items():
            rows = ids + self.tables.offsets[layer]  # (B, L, K) table rows
            stale = np.isin(rows, changed[layer])
            if stale.any():
                gathered = batch["rows"][layer].reshape(*rows.shape, -1)
                gathered[stale] = self.tables.tables[layer][rows[stale]]
                batch["rows"][layer] = gathered.reshape(batch["rows"][layer].shape)

    def state(self) -> dict:
        """A copy of the tables and moments, {"tables" | "mu" | "nu": {str(layer): array}}, for
        a checkpoint (a copy: the loop goes on updating the arrays while it is written)."""
        return jax.tree.map(np.copy, self.restore_target())

    def restore_target(self) -> dict:
        """`state`'s structure over the live arrays (not copied): the target that restores it
        as numpy arrays in host memory."""
        named = lambda arrays: {str(layer): a for layer, a in arrays.items()}
        return {"tables": named(self.tables.tables), "mu": named(self.mu), "nu": named(self.nu)}

    def load_state(self, state: dict) -> None:
        """Takes the values of a `state` (restored from a checkpoint)."""
        for name, arrays in (("tables", self.tables.tables), ("mu", self.mu), ("nu", self.nu)):
            for layer, array in arrays.items():
                np.copyto(array, np.asarray(state[name][str(layer)]))


class HostRowFeed:
    """Training batches with their rows from host tables, one batch read ahead.

    `next()` gives the read-ahead batch (or reads one); `read_ahead()` reads the next batch and
    gathers its rows, meant to run while the device computes; `patch(changed)` brings the
    read-ahead rows up to date after `HostTableOptimizer.apply`. A checkpoint saves this feed as
    the data iterator: its state is the one before the read-ahead batch.

    Args:
      iterator: the training batches (a grain iterator).
      tables: the host tables.
    """

    def __init__(self, iterator, tables: HostTableOptimizer):
        self.iterator, self.tables = iterator, tables
        self._ahead: tuple[dict, dict] | None = None  # (iterator state before it, batch)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._ahead is None:
            self.read_ahead()
        (_, batch), self._ahead = self._ahead, None
        return batch

    def read_ahead(self) -> None:
        state = self.iterator.get_state()
        batch = dict(next(self.iterator))
        batch["rows"] = self.tables.gather(batch["hash_ids"])
        self._ahead = state, batch

    def patch(self, changed: dict[int, np.ndarray]) -> None:
        if self._ahead is not None:
            self.tables.patch(self._ahead[1], changed)

    # The iterator protocol of grain's checkpoint handler (bytes for iterators of other kinds).
    def get_state(self) -> bytes:
        state = self._ahead[0] if self._ahead is not None else self.iterator.get_state()
        return json.dumps(state, indent=4).encode()

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state))
        self._ahead = None

    def start_prefetch(self) -> None:
        self.iterator.start_prefetch()


def _engram_layer(path: tuple) -> int:
    """The layer of an Engram table's state path: blocks/<layer>/engram/table, or
    blocks/<run>/engram/<layer>/table in a scanned run."""
    return int(path[-3] if path[-2] == "engram" else path[-2])


def with_device_tables(model: Transformer, tables: HostTables) -> Transformer:
    """A model with `engram.table_placement: device` holding `model`'s parameters and the host
    `tables` (for evaluation, analysis and decoding of a run trained with host tables)."""
    engram = dataclasses.replace(model.config.engram, table_placement="device")
    config = dataclasses.replace(model.config, engram=engram)
    device_model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    values = dict(nnx.to_flat_state(nnx.state(model)))

    def value(path, variable):
        if is_engram_table(path):
            return variable.replace(jnp.asarray(tables.tables[_engram_layer(path)]))
        return values[path]

    state = nnx.from_flat_state([(path, value(path, variable)) for path, variable
                                 in nnx.to_flat_state(nnx.state(device_model))])
    nnx.update(device_model, state)
    return device_model
