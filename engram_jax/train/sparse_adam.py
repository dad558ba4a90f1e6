"""Row-sparse Adam for the Engram tables (`train.table_optimizer: sparse_adam`).

A step touches B x L x K rows of a table, not the table. Here the loss is differentiated with
respect to the gathered rows (`Transformer.next_token_nll(..., rows=...)`), never the table, so
no table-sized gradient exists; the rows' gradients are summed per distinct row and only those
rows update their moments and values (the lazy Adam of embedding systems):

    for each row r the step touched, g_r = the sum of its gradients in the batch
    m_r <- b1 m_r + (1 - b1) g_r;  v_r <- b2 v_r + (1 - b2) g_r^2
    w_r <- w_r - lr_t (m_r / (1 - b1^t)) / (sqrt(v_r / (1 - b2^t)) + eps)

with t the optimiser's step count. Dense Adam also decays the moments of the rows a step did not
touch and keeps moving them by their remaining momentum; lazy Adam leaves them as they are. The
first step is the same for both (untouched rows have zero moments then), later ones differ in
the untouched rows only. Gradient clipping stays global: the rows' gradient sums enter the norm
as the table's gradient would. docs/ARCHITECTURE.md, "Row-sparse table optimiser".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from engram_jax.nn.engram import lookup_embeddings
from engram_jax.nn.model import Transformer, is_engram_table
from engram_jax.sharding import table_shards


def unique_row_sums(row_ids: jax.Array, grads: jax.Array,
                    num_rows: int) -> tuple[jax.Array, jax.Array]:
    """Sums the gradients of repeated rows.

    Args:
      row_ids: int32 (N,) table rows, repeats allowed.
      grads: (N, D) their gradients.
      num_rows: the table's rows.

    Returns:
      int32 (N,) the distinct rows, then `num_rows` (no row) as filler, and float32 (N, D) the
      summed gradient of each (zeros for the filler).
    """
    unique, inverse = jnp.unique(row_ids, size=row_ids.shape[0], fill_value=num_rows,
                                 return_inverse=True)
    sums = jax.ops.segment_sum(grads.astype(jnp.float32), inverse.reshape(-1),
                               num_segments=row_ids.shape[0])
    return unique, sums


def _adam(values, mu, nu, grads, count, learning_rate, *, b1, b2, eps):
    """Adam's step on rows: (values, first and second moments) after gradients `grads`, with
    bias correction at step `count` (t >= 1)."""
    m = b1 * mu + (1 - b1) * grads
    v = b2 * nu + (1 - b2) * jnp.square(grads)
    t = count.astype(jnp.int32)
    direction = (m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps)
    return values + direction * -learning_rate, m, v


def lazy_adam_rows(table: jax.Array, mu: jax.Array, nu: jax.Array, rows: jax.Array,
                   grads: jax.Array, count: jax.Array, learning_rate: jax.Array, *, b1: float,
                   b2: float, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One lazy Adam step on the distinct `rows` (int32 (N,), filler ids >= the table's rows
    are ignored) with their summed gradients `grads` (N, D); `count` is the step number t >= 1.
    Returns the table and its first and second moments (each (R, D)), other rows unchanged."""
    take = lambda a: a.at[rows].get(mode="fill", fill_value=0)
    values, m, v = _adam(take(table), take(mu), take(nu), grads, count, learning_rate,
                         b1=b1, b2=b2, eps=eps)
    return (table.at[rows].set(values.astype(table.dtype), mode="drop"),
            mu.at[rows].set(m, mode="drop"), nu.at[rows].set(v, mode="drop"))


def lazy_adam_masked(table: jax.Array, mu: jax.Array, nu: jax.Array, touched: jax.Array,
                     grad: jax.Array, count: jax.Array, learning_rate: jax.Array, *, b1: float,
                     b2: float, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`lazy_adam_rows` for a table-shaped gradient `grad` (R, D) and a bool (R,) mask of the
    rows the step touched; the form for a table split over devices, where each holds its
    shard's gradient (the lookup's transpose) and updates its own rows."""
    values, m, v = _adam(table, mu, nu, grad, count, learning_rate, b1=b1, b2=b2, eps=eps)
    keep = touched[:, None]
    return (jnp.where(keep, values, table).astype(table.dtype), jnp.where(keep, m, mu),
            jnp.where(keep, v, nu))


def _table_gradient(engram, hash_ids: jax.Array, row_grad: jax.Array) -> jax.Array:
    """The table's gradient (R, head_dim) from its rows' (B, L, E): the transpose of the
    layer's lookup, so on a mesh it is split by rows like the table (each device holds its
    shard's)."""
    offsets = jnp.asarray(engram.layout.offsets, jnp.int32)
    table = engram.table[...]
    _, pullback = jax.vjp(lambda t: lookup_embeddings(t, offsets, hash_ids, engram.config.lookup,
                                                      engram.config.lookup_capacity), table)
    return pullback(row_grad.astype(table.dtype))[0].astype(jnp.float32)


def dense_params(path, value) -> bool:
    """The parameters the dense optimiser updates (an nnx filter): all but the Engram tables."""
    return isinstance(value, nnx.Param) and not is_engram_table(path)


class TableMoment(nnx.OptState):
    """A row-sparse moment of an Engram table, shaped and sharded as the table."""


class SparseTableOptimizer(nnx.Optimizer):
    """`nnx.Optimizer` over every parameter but the Engram tables, plus lazy Adam moments of
    the tables (`mu`, `nu`: layer -> (R, head_dim) float32, sharded as the tables), checkpointed
    with the rest of the optimiser state. With host-resident tables (`engram.table_placement:
    host`) the moments live with the tables on the host (`engram_jax.train.host_tables`) and
    `update` returns the rows' step instead of taking it.

    Args:
      model: the model.
      tx: the dense parameters' transform (without clipping: `update` clips globally).
      table_learning_rate: the tables' schedule, step -> learning rate.
      b1, b2, eps: Adam's constants for the tables.
      clip_norm: global gradient-norm clip over all gradients, tables included (0: none).
    """

    def __init__(self, model: Transformer, tx: optax.GradientTransformation,
                 table_learning_rate: optax.Schedule, *, b1: float, b2: float, eps: float,
                 clip_norm: float):
        super().__init__(model, tx, wrt=dense_params)
        self.table_learning_rate, self.clip_norm = table_learning_rate, clip_norm
        self.b1, self.b2, self.eps = b1, b2, eps

        def zeros(engram):
            metadata = engram.table.get_metadata()
            return TableMoment(jnp.zeros(engram.table.shape, jnp.float32), **metadata)

        engrams = model.engram_modules()
        self.on_host = model.config.engram.table_placement == "host"
        on_device = {} if self.on_host else engrams
        self.mu = nnx.Dict({str(layer): zeros(e) for layer, e in on_device.items()})
        self.nu = nnx.Dict({str(layer): zeros(e) for layer, e in on_device.items()})

    def gather_rows(self, model: Transformer, hash_ids: dict) -> dict[int, jax.Array]:
        """layer -> (B, L, E) the rows of hash ids (B, L, K), in the tables' dtype: what the
        loss is differentiated with respect to."""
        return {layer: engram.embed(hash_ids[layer]).astype(engram.table.dtype)
                for layer, engram in model.engram_modules().items()}

    def update(self, model: Transformer, grads, /, *, hash_ids: dict[int, jax.Array],
               row_grads: dict[int, jax.Array]) -> tuple[jax.Array, dict]:
        """One step: `grads` of the dense parameters (`dense_params`), and per Engram layer
        the hash ids (B, L, K) and the gradient (B, L, E) of the rows `gather_rows` (or the
        host) gave for them.

        Returns:
          The global gradient norm before clipping, and for host tables their step (else {}):
          {"learning_rate": f32, "count": the step number t, "rows": {layer: int32 (B, L, K)
          the table rows of the hash ids}, "grads": {layer: float32 (B, L, E) their clipped
          gradients}}, split over devices as the batch (repeated rows are summed on the host,
          so no device holds the global batch's distinct rows).
        """
        engrams = model.engram_modules()
        # One device per table (or tables on the host): the touched rows' summed gradients. A
        # table split over devices: its shard's gradient on each, from the lookup's transpose,
        # and a mask of the touched rows (the global batch's distinct ids, unique'd on every
        # device, would be replicated).
        by_rows = self.on_host or all(table_shards(e.table.shape[0]) == 1
                                      for e in engrams.values())
        table_rows, table_grads, touched = {}, {}, {}
        for layer, engram in engrams.items():
            ids = table_rows[layer] = hash_ids[layer] + jnp.asarray(engram.layout.offsets,
                                                                    jnp.int32)
            rows = engram.layout.padded_rows
            if by_rows:
                table_grads[layer] = unique_row_sums(
                    ids.reshape(-1), row_grads[layer].reshape(-1, engram.config.head_dim), rows)
            else:
                table_grads[layer] = _table_gradient(engram, hash_ids[layer], row_grads[layer])
                touched[layer] = jnp.zeros((rows,), bool).at[ids.reshape(-1)].set(True)
        squares = [optax.tree.norm(grads, squared=True)]
        squares += [jnp.sum(jnp.square(g[1] if by_rows else g)) for g in table_grads.values()]
        norm = jnp.sqrt(sum(squares))
        clipped = lambda g: g
        if self.clip_norm:
            clipped = lambda g: jax.lax.select(norm < self.clip_norm, g,
                                               (g / norm.astype(g.dtype)) * self.clip_norm)
            grads = jax.tree.map(clipped, grads)
        learning_rate = self.table_learning_rate(self.step[...])
        count = self.step[...] + 1
        super().update(model, grads)
        if self.on_host:  # per token, split over the batch as it is: the host sums repeats
            return norm, {"learning_rate": learning_rate, "count": count,
                          "rows": {str(k): ids for k, ids in table_rows.items()},
                          "grads": {str(k): clipped(row_grads[k].astype(jnp.float32))
                                    for k in engrams}}
        hyper = dict(b1=self.b1, b2=self.b2, eps=self.eps)
        for layer, engram in engrams.items():
            key = str(layer)
            state = (engram.table[...], self.mu[key][...], self.nu[key][...])
            if by_rows:
                rows, sums = table_grads[layer]
                state = lazy_adam_rows(*state, rows, clipped(sums), count, learning_rate, **hyper)
            else:
                state = lazy_adam_masked(*state, touched[layer], clipped(table_grads[layer]),
                                         count, learning_rate, **hyper)
            engram.table[...], self.mu[key][...], self.nu[key][...] = state
        return norm, {}
