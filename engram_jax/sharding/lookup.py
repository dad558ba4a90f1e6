"""Reading a row-sharded Engram table without an all-reduce.

Under the compiler's automatic partitioning a gather from a table split by rows becomes an
all-reduce of the whole (B, L, width) output and of the whole table gradient. Two exchanges are
written by hand with `jax.shard_map` instead (docs/ARCHITECTURE.md, "Sharding"):

  exchange_lookup  each device sends its distinct ids to their owners and gets the rows back
                   (`all_to_all`): traffic and buffers follow the device's own ids (while the
                   number of shards stays below them).
  routed_lookup    ids all-gathered, each device reads the rows it owns for the whole gathered
                   batch, a reduce-scatter returns them: traffic grows with the batch axes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

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


class _Requests(NamedTuple):
    """A device's distinct ids, bucketed by owning shard (every leaf an int32 array).

    unique: (n,) the distinct ids in ascending order, then `num_rows` as filler; since shards
      own contiguous row ranges, each shard's ids are one contiguous run.
    inverse: (n,) index into `unique` of each original id.
    bounds: (S + 1,) where each shard's run starts in `unique` (the last: the distinct count).
    rounds: () exchanges of `capacity` ids per destination needed by the busiest pair of
      devices of the mesh (the same on every device).
    """
    unique: jax.Array
    inverse: jax.Array
    bounds: jax.Array
    rounds: jax.Array


def _bucket_requests(ids: jax.Array, rows_per_shard: int, num_shards: int, capacity: int,
                     mesh_axes: tuple[str, ...]) -> _Requests:
    """Distinct ids of `ids` (n,) and their owners; the round count agreed over `mesh_axes`."""
    num_rows = rows_per_shard * num_shards
    unique, inverse = jnp.unique(ids, size=ids.shape[0], fill_value=num_rows,
                                 return_inverse=True)
    starts = jnp.arange(num_shards + 1, dtype=unique.dtype) * rows_per_shard
    bounds = jnp.searchsorted(unique, starts).astype(jnp.int32)
    busiest = jax.lax.pmax(jnp.max(jnp.diff(bounds)), mesh_axes)
    rounds = jnp.maximum(1, -(-busiest // capacity))
    return _Requests(unique, inverse.reshape(ids.shape).astype(jnp.int32), bounds, rounds)


def _round_slots(requests: _Requests, round_index, capacity: int):
    """Which entries of `unique` go to each destination in round `round_index`: slots (S, C)
    into `unique` and a bool (S, C) mask of the slots in use."""
    offset = round_index * capacity + jnp.arange(capacity, dtype=jnp.int32)
    slots = requests.bounds[:-1, None] + offset[None]
    used = offset[None] < jnp.diff(requests.bounds)[:, None]
    return jnp.minimum(slots, requests.unique.shape[0] - 1), used


def round_capacity(ids_per_device: int, num_shards: int, capacity_factor: float) -> int:
    """Ids a device sends each owner per round of `exchange_lookup`: ceil(capacity_factor x an
    even split of its ids), at least 1 and at most all of them."""
    return max(1, min(ids_per_device, math.ceil(capacity_factor * ids_per_device / num_shards)))


def _exchange(a: jax.Array, table_axes: tuple[str, ...]) -> jax.Array:
    """Leading-axis block s of `a` (S, ...) to table shard s; returns what each shard sent."""
    return jax.lax.all_to_all(a, table_axes, 0, 0, tiled=True)


def _send_ids(requests: _Requests, slots, used):
    return jnp.where(used, requests.unique[slots], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _exchange_rows(table_shard: jax.Array, ids: jax.Array, table_axes: tuple[str, ...],
                   mesh_axes: tuple[str, ...], capacity: int) -> jax.Array:
    """Rows (n, W) of a table split by rows over `table_axes` for this device's ids (n,)."""
    return _exchange_rows_forward(table_shard, ids, table_axes, mesh_axes, capacity)[0]


def _exchange_rows_forward(table_shard, ids, table_axes, mesh_axes, capacity):
    rows_per_shard, width = table_shard.shape
    num_shards = jax.lax.axis_size(table_axes)
    requests = _bucket_requests(ids, rows_per_shard, num_shards, capacity, mesh_axes)
    first_row = jax.lax.axis_index(table_axes) * rows_per_shard
    exchange = functools.partial(_exchange, table_axes=table_axes)

    def one_round(round_index, unique_rows):
        slots, used = _round_slots(requests, round_index, capacity)
        received = exchange(_send_ids(requests, slots, used))  # (S, C): ids others want
        found = _owned_rows(table_shard, received - first_row, received >= 0)
        returned = exchange(found)  # (S, C, W): the rows of this device's requests
        return unique_rows.at[jnp.where(used, slots, ids.shape[0])].set(returned, mode="drop")

    unique_rows = jax.lax.fori_loop(0, requests.rounds, one_round,
                                    jnp.zeros((ids.shape[0], width), table_shard.dtype))
    return unique_rows[requests.inverse], requests


def _exchange_rows_fwd(table_shard, ids, table_axes, mesh_axes, capacity):
    rows, requests = _exchange_rows_forward(table_shard, ids, table_axes, mesh_axes, capacity)
    # A (rows per shard, 0) array carries the shard's row count and dtype, and holds nothing.
    return rows, (requests, jnp.zeros((table_shard.shape[0], 0), table_shard.dtype))


def _exchange_rows_bwd(table_axes, mesh_axes, capacity, residuals, row_grads):
    """The transposed exchange: the distinct ids' summed row gradients go to their owners in the
    same rounds, and each owner adds what it receives into its rows' gradient."""
    requests, shard_probe = residuals
    rows_per_shard, width = shard_probe.shape[0], row_grads.shape[-1]
    first_row = jax.lax.axis_index(table_axes) * rows_per_shard
    exchange = functools.partial(_exchange, table_axes=table_axes)
    # Summed in float32, so that repeated ids lose nothing in a bf16 table.
    unique_grads = jnp.zeros(row_grads.shape, jnp.float32).at[requests.inverse].add(row_grads)

    def one_round(round_index, table_grad):
        slots, used = _round_slots(requests, round_index, capacity)
        received = exchange(_send_ids(requests, slots, used))
        sent = jnp.where(used[..., None], unique_grads[slots], 0).astype(row_grads.dtype)
        arrived = exchange(sent)  # (S, C, W): gradients of the rows this device owns
        local = jnp.where(received >= 0, received - first_row, rows_per_shard)
        return table_grad.at[local].add(arrived.astype(jnp.float32), mode="drop")

    table_grad = jax.lax.fori_loop(0, requests.rounds, one_round,
                                   jnp.zeros((rows_per_shard, width), jnp.float32))
    return table_grad.astype(shard_probe.dtype), None


_exchange_rows.defvjp(_exchange_rows_fwd, _exchange_rows_bwd)


def exchange_lookup(table: jax.Array, rows: jax.Array, table_axes: tuple[str, ...],
                    batch_axes: tuple[str, ...], capacity_factor: float = 0.75) -> jax.Array:
    """table[rows] for a table split by rows over `table_axes`, by an all-to-all of ids and rows.

    Inside `shard_map`, each device finds its distinct ids (n of them at most, for n local ids),
    buckets them by owning shard and sends each bucket to its owner with `all_to_all`, in
    buffers of C = ceil(capacity_factor * n / S) ids per destination (S table shards); owners
    read the rows and the reverse `all_to_all` returns them, and each original position takes
    its id's row. A device with more than C distinct ids for one owner needs more rounds of the
    same exchange: every device runs as many as the busiest pair needs, so nothing is dropped.
    The gradient (a `jax.custom_vjp`) sends each distinct id's summed gradient to its owner in
    the same rounds; it stays row-sharded. Table axes that do not split the batch (devices with
    the same ids) each request the rows they need from every shard, so no sum is needed.

    Args:
      table: (R, W) rows, R divisible by the product of `table_axes` sizes.
      rows: int32 (B, ...) row ids in [0, R) (hash ids plus head offsets always are), batch
        split over `batch_axes`.
      capacity_factor: ids per destination per round, relative to an even split of n.
    Returns:
      (B, ..., W), split like `rows`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    num_shards = math.prod(mesh.shape[a] for a in table_axes)
    batch_spec = P(batch_axes or None)

    def local(table_shard, local_rows):
        ids = local_rows.reshape(-1)
        capacity = round_capacity(ids.shape[0], num_shards, capacity_factor)
        found = _exchange_rows(table_shard, ids, table_axes, tuple(mesh.axis_names), capacity)
        return found.reshape(*local_rows.shape, table_shard.shape[1])

    return jax.shard_map(local, in_specs=(P(table_axes, None), batch_spec),
                         out_specs=batch_spec, check_vma=False)(table, rows)


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


def table_lookup(table: jax.Array, rows: jax.Array, mode: str = "all_to_all",
                 capacity_factor: float = 0.75) -> jax.Array:
    """table[rows]; when a mesh splits the rows, through `exchange_lookup` (mode "all_to_all",
    with `capacity_factor`), `routed_lookup` ("routed") or the compiler's gather ("auto")."""
    if mode == "auto" or table_shards(table.shape[0]) == 1:
        return jnp.take(table, rows, axis=0)
    table_axes, batch_axes = mesh_axes_of(ENGRAM_ROWS), mesh_axes_of(BATCH)
    if mode == "all_to_all":
        return exchange_lookup(table, rows, table_axes, batch_axes, capacity_factor)
    if mode == "routed":
        return routed_lookup(table, rows, table_axes, batch_axes)
    raise ValueError(f"unknown lookup mode {mode!r}")
