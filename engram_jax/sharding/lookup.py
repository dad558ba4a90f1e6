"""The routed Engram table lookup: reading a row-sharded table without an all-reduce.

Under the compiler's automatic partitioning a gather from a table split by rows becomes an
all-reduce of the whole (B, L, width) output and of the whole table gradient. `routed_lookup`
writes the exchange by hand with `jax.shard_map` instead (docs/ARCHITECTURE.md, "Sharding").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from engram_jax.config.schema import ConfigError
from engram_jax.sharding.axes import BATCH, ENGRAM_ROWS
from engram_jax.sharding.mesh import mesh_axes_of


def routed_lookup(table: jax.Array, rows: jax.Array, table_axes: tuple[str, ...],
                  batch_axes: tuple[str, ...]) -> jax.Array:
    """table[rows] for a table split by rows over `table_axes`, without an all-reduce.

    Inside `shard_map`, ids are all-gathered over the batch axes that also split the table; each
    device gathers the rows it owns (zeros elsewhere); the partial results are reduce-scattered
    back to the batch shards (and summed over table axes that do not split the batch). The
    gradient takes the transposed path and stays row-sharded.

    Args:
      table: (R, W) rows, R divisible by the product of `table_axes` sizes.
      rows: int32 (B, ...) row ids, batch split over `batch_axes`.
    Returns:
      (B, ..., W), split like `rows`.
    """
    gather_axes = tuple(a for a in batch_axes if a in table_axes)
    sum_axes = tuple(a for a in table_axes if a not in batch_axes)
    batch_spec = P(batch_axes or None)

    def local(table_shard, local_rows):
        per_shard = table_shard.shape[0]
        ids = jax.lax.all_gather(local_rows, gather_axes, axis=0, tiled=True) if gather_axes \
            else local_rows
        offset = jax.lax.axis_index(table_axes) * per_shard
        local_ids = ids - offset
        owned = (local_ids >= 0) & (local_ids < per_shard)
        found = _owned_rows(table_shard, local_ids, owned)
        if gather_axes:
            found = jax.lax.psum_scatter(found, gather_axes, scatter_dimension=0, tiled=True)
        return jax.lax.psum(found, sum_axes) if sum_axes else found

    return jax.shard_map(local, in_specs=(P(table_axes, None), batch_spec),
                         out_specs=batch_spec)(table, rows)


def _owned_rows(table_shard: jax.Array, local_ids: jax.Array, owned: jax.Array) -> jax.Array:
    """Rows of this shard for the ids it owns, zeros for the others: (..., W)."""
    rows = jnp.take(table_shard, jnp.where(owned, local_ids, 0), axis=0)
    return rows * owned[..., None].astype(table_shard.dtype)


def table_shards(num_rows: int) -> int:
    """Number of row shards of an Engram table under the active mesh and rules (1 without).

    Raises:
      ConfigError: the rows do not split evenly (naming `engram.table_row_multiple`).
    """
    table_axes = mesh_axes_of(ENGRAM_ROWS)
    mesh = jax.sharding.get_abstract_mesh()
    shards = math.prod(mesh.shape[a] for a in table_axes) if table_axes else 1
    if num_rows % shards:
        raise ConfigError(f"an Engram table of {num_rows} rows cannot be split into {shards} "
                          f"equal shards: make engram.table_row_multiple a multiple of {shards}")
    return shards


def table_lookup(table: jax.Array, rows: jax.Array, mode: str = "routed") -> jax.Array:
    """table[rows]; with mode "routed", through `routed_lookup` when a mesh splits the rows."""
    if mode == "auto" or table_shards(table.shape[0]) == 1:
        return jnp.take(table, rows, axis=0)
    return routed_lookup(table, rows, mesh_axes_of(ENGRAM_ROWS), mesh_axes_of(BATCH))
