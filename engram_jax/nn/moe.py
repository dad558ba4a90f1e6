"""DeepSeekMoE: shared experts plus fine-grained routed experts (docs/ARCHITECTURE.md, "MoE").

Routing: sigmoid affinities; the top-k experts are chosen by affinity + a balancing bias (used for
selection only); the chosen affinities, normalised to sum to 1, weight the experts' outputs.
Auxiliary-loss-free balancing: after each step the bias of every expert moves by
`rate * sign(mean load - its load)`.

Dispatch is dropless by default: assignments are sorted by expert and each expert multiplies its
contiguous group (`jax.lax.ragged_dot`). A capacity-factor mode (fixed per-expert buffers, overflow
dropped) is available for platforms where fixed shapes are preferable.

On a mesh the routed experts run inside `jax.shard_map` (`sharded_moe`): every batch shard routes
and sorts only its own tokens. The router and expert weights enter in their FSDP layout and are
all-gathered inside the map (their gradients leave reduce-scattered); experts stay split over
`expert`, their hidden units over `tensor`. With an `expert` axis of size > 1 the assignments
travel to the shard that holds their expert and back by `all_to_all` (`exchange_dispatch`), in
rounds of fixed buffers of `exchange_capacity` times the balanced load per destination; the
shards agree on the rounds a step needs, so dropless stays exact under any skew, and the
backward pass is the same rounds (a custom VJP). Load counts are summed over the batch shards,
so balancing sees the global load.

Shapes: T tokens, D width, E routed experts, F expert hidden width, k = top_k.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.config.schema import MoEConfig
from engram_jax.nn.ffn import SwiGLU
from engram_jax.nn.params import logical_param, scaled_normal
from engram_jax.sharding.axes import BATCH, EMBED, EXPERT_MLP, EXPERTS
from engram_jax.sharding.mesh import logical_spec, mesh_axes_of


class RouterBias(nnx.Variable):
    """The balancing bias: updated by `balance_bias_update`, never by gradients."""


class ExpertLoad(nnx.Variable):
    """Tokens routed to each expert since the last bias update (float32 counts)."""


def route(x: jax.Array, router_kernel: jax.Array, bias: jax.Array, top_k: int,
          routed_scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Chooses experts for each token, in float32.

    Args:
      x: (T, D) tokens; router_kernel: (D, E); bias: (E,) selection bias.

    Returns:
      weights: float32 (T, k), the chosen sigmoid affinities normalised to sum to routed_scale.
      experts: int32 (T, k) chosen expert ids.
    """
    affinity = jax.nn.sigmoid(x.astype(jnp.float32) @ router_kernel.astype(jnp.float32))
    _, experts = jax.lax.top_k(affinity + bias.astype(jnp.float32), top_k)
    chosen = jnp.take_along_axis(affinity, experts, axis=-1)
    weights = routed_scale * chosen / jnp.sum(chosen, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def expert_counts(experts: jax.Array, num_experts: int) -> jax.Array:
    """float32 (E,) number of assignments to each expert."""
    return jnp.zeros(num_experts, jnp.float32).at[experts.reshape(-1)].add(1.0)


def balance_bias_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """bias + rate * sign(mean(load) - load) over the last (expert) axis, so stacked layers
    (`model.scan_layers`) update each layer alone: under-loaded experts become more likely."""
    mean = jnp.mean(load, axis=-1, keepdims=True)
    return bias + rate * jnp.sign(mean - load).astype(bias.dtype)


def _sort_by_expert(experts: jax.Array, num_experts: int):
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, flat[order], sizes


def _combine(expert_out_sorted: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """Undoes the sort and sums each token's k expert outputs with its weights -> (T, D)."""
    tokens, k = weights.shape
    unsorted = jnp.zeros_like(expert_out_sorted).at[order].set(expert_out_sorted)
    unsorted = unsorted.reshape(tokens, k, -1)
    return jnp.einsum("tkd,tk->td", unsorted, weights.astype(unsorted.dtype))


def dispatch_dropless(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: jax.Array,
                      w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Every assignment is computed: sort by expert, grouped matmuls, unsort, weighted sum.

    Args:
      x: (T, D); experts: int (T, k); weights: (T, k);
      w_gate, w_up: (E, D, F); w_down: (E, F, D).
    """
    k = experts.shape[1]
    order, _, sizes = _sort_by_expert(experts, w_gate.shape[0])
    return _combine(_grouped_experts(x[order // k], sizes, w_gate, w_up, w_down), order, weights)


def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    """Rows grouped by expert times their expert's matrix: x (R, D), w (E, D, F), sizes int32
    (E,) -> (R, F); rows past sum(sizes) are unspecified.

    `jax.lax.ragged_dot`, except on TPU, where its weight gradient is computed for every expert
    over every row (E times the work; docs/ARCHITECTURE.md, "MoE"): there the megablox
    grouped-matmul kernels of jax's Pallas ops, whose gradients are grouped too. On CPU, where
    XLA computes `ragged_dot` as one dense matmul of every row against every expert (E times
    the work, forward and backward), `tiled_grouped_matmul`.
    """
    return jax.lax.platform_dependent(x, w, sizes, tpu=_megablox_matmul,
                                      cpu=tiled_grouped_matmul, default=jax.lax.ragged_dot)


def grouped_tile_rows(rows: int, num_experts: int) -> int:
    """Rows of a tile of `tiled_grouped_matmul`: the largest power of two <= rows / (8 E), in
    [1, 128], so the padding of each expert's last tile adds at most 1/8 to the rows."""
    target = max(1, min(128, rows // (8 * num_experts)))
    return 1 << (target.bit_length() - 1)


def tiled_grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    """`grouped_matmul` as a batch of tiles of one expert each: x (R, D), w (E, D, F), sizes
    int32 (E,) -> (R, F), rows past sum(sizes) zero.

    Each expert's rows are padded to whole tiles of `grouped_tile_rows` rows (at most
    ceil(R / tile) + min(E, R) tiles in all, a static bound), every tile is multiplied by its
    expert's matrix (one batched matmul over tiles), and the rows are gathered back: the work
    is the rows' own plus the padding, where XLA's CPU `ragged_dot` multiplies every row by
    every expert."""
    rows, num_experts = x.shape[0], w.shape[0]
    tile = grouped_tile_rows(rows, num_experts)
    num_tiles = -(-rows // tile) + (min(num_experts, rows) if tile > 1 else 0)
    tiles_per_expert = (sizes + tile - 1) // tile
    first_tile = jnp.cumsum(tiles_per_expert) - tiles_per_expert  # (E,)
    first_row = jnp.cumsum(sizes) - sizes  # (E,)
    # Expert of each tile (tiles past the last expert's take expert E - 1 and zero rows).
    tile_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(tiles_per_expert),
                                               jnp.arange(num_tiles), side="right"),
                              num_experts - 1)
    # Source row of each padded slot, and whether it holds one.
    slot = jnp.arange(num_tiles * tile)
    slot_expert = tile_expert[slot // tile]
    rank = slot - first_tile[slot_expert] * tile
    filled = (rank >= 0) & (rank < sizes[slot_expert])
    source = jnp.where(filled, first_row[slot_expert] + rank, 0)
    padded = jnp.where(filled[:, None], x[source], 0).reshape(num_tiles, tile, x.shape[1])
    out = jnp.einsum("ntd,ndf->ntf", padded, w[tile_expert]).reshape(num_tiles * tile, -1)
    # Slot of each row: its expert's first slot plus its rank in the group.
    row = jnp.arange(rows)
    row_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes), row, side="right"),
                             num_experts - 1)
    row_slot = first_tile[row_expert] * tile + row - first_row[row_expert]
    valid = row < jnp.sum(sizes)
    return jnp.where(valid[:, None], out[jnp.where(valid, row_slot, 0)], 0)


def _megablox_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.megablox import ops  # TPU kernels, traced on demand

    tile = 128  # the kernel's row tile: rows are padded to a multiple of it
    rows = x.shape[0]
    padded = jnp.pad(x, ((0, -rows % tile), (0, 0)))
    return ops.gmm(padded, w, sizes, x.dtype, (tile, tile, tile))[:rows]


def _grouped_experts(xs: jax.Array, sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                     w_down: jax.Array) -> jax.Array:
    """SwiGLU experts on rows grouped by expert: xs (R, D), sizes int32 (E,) -> (R, D).
    Rows past sum(sizes) come out as zeros."""
    hidden = jax.nn.silu(grouped_matmul(xs, w_gate, sizes)) * grouped_matmul(xs, w_up, sizes)
    out = grouped_matmul(hidden, w_down, sizes)
    return jnp.where((jnp.arange(xs.shape[0]) < jnp.sum(sizes))[:, None], out, 0)


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Per-expert buffer size: ceil(capacity_factor * tokens * top_k / num_experts)."""
    return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


def dispatch_with_capacity(x: jax.Array, experts: jax.Array, weights: jax.Array,
                           w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                           capacity: int) -> jax.Array:
    """Like `dispatch_dropless`, but each expert takes at most `capacity` assignments (in token
    order); the rest contribute nothing."""
    num_experts, k = w_gate.shape[0], experts.shape[1]
    order, sorted_experts, sizes = _sort_by_expert(experts, num_experts)
    starts = jnp.cumsum(sizes) - sizes
    rank = jnp.arange(order.shape[0]) - starts[sorted_experts]
    keep = rank < capacity
    slot = jnp.where(keep, rank, capacity)  # out of bounds: dropped by the scatter
    buffer = jnp.zeros((num_experts, capacity, x.shape[-1]), x.dtype)
    buffer = buffer.at[sorted_experts, slot].set(x[order // k], mode="drop")
    hidden = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buffer, w_gate)) * jnp.einsum(
        "ecd,edf->ecf", buffer, w_up)
    out = jnp.einsum("ecf,efd->ecd", hidden, w_down)
    out_sorted = out[sorted_experts, jnp.minimum(rank, capacity - 1)] * keep[:, None].astype(
        out.dtype)
    return _combine(out_sorted, order, weights)


def exchange_dispatch(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: jax.Array,
                      w_up: jax.Array, w_down: jax.Array, *, axis_name: str | tuple[str, ...],
                      num_shards: int, capacity: int, per_expert_capacity: int | None = None
                      ) -> jax.Array:
    """Expert-parallel dispatch of one shard's tokens, inside `shard_map` (docs/ARCHITECTURE.md,
    "MoE"): each of the `num_shards` shards along `axis_name` holds E/num_shards experts.

    The shard sorts its assignments by expert (so by destination shard) and ranks them within
    their destination. In rounds, it packs the next `capacity` of every destination into a
    (num_shards, capacity, D) buffer and `all_to_all` delivers them; the owner runs its experts
    on what it received and the reverse `all_to_all` brings the rows back. The shards agree on
    the number of rounds (`pmax` of the busiest destination), so every assignment is computed
    (dropless) whatever the skew, and a balanced step takes one round. With
    `per_expert_capacity` only the first that many assignments of each expert, in this shard's
    token order, are kept (capacity mode); the rest give nothing.

    Args:
      x: (T, D) this shard's tokens; experts: int (T, k) global expert ids; weights: (T, k);
      w_gate, w_up: (E / num_shards, D, F) this shard's experts; w_down: (E / num_shards, F, D);
      per_expert_capacity: assignments each expert keeps from this shard, or None (all).

    Returns:
      (T, D): each token's weighted sum of its experts' outputs.
    """
    local_experts = w_gate.shape[0]
    order, sorted_experts, sizes = _sort_by_expert(experts, local_experts * num_shards)
    destination = sorted_experts // local_experts
    kept = jnp.ones_like(destination, bool)
    if per_expert_capacity is not None:  # first come, first kept per expert
        rank_in_expert = jnp.arange(order.shape[0]) - (jnp.cumsum(sizes) - sizes)[sorted_experts]
        kept = rank_in_expert < per_expert_capacity
    per_destination = jnp.zeros(num_shards, jnp.int32).at[destination].add(kept.astype(jnp.int32))
    rank = jnp.cumsum(kept) - 1 - (jnp.cumsum(per_destination) - per_destination)[destination]
    rank = jnp.where(kept, rank, order.shape[0] + capacity)  # in no round
    busiest = jax.lax.pmax(jnp.max(per_destination), axis_name)
    rounds = (busiest + capacity - 1) // capacity
    rows = _exchange_rounds(axis_name, num_shards, capacity, x[order // experts.shape[1]],
                            sorted_experts % local_experts, destination, rank, rounds,
                            w_gate, w_up, w_down)
    return _combine(rows, order, weights)


def _round_slots(rank: jax.Array, round_index: jax.Array, capacity: int) -> jax.Array:
    """Each assignment's slot in its destination's buffer in this round, or `capacity` (not
    sent) when the round does not carry it."""
    slot = rank - round_index * capacity
    return jnp.where((slot >= 0) & (slot < capacity), slot, capacity)


def _pack(values: jax.Array, destination: jax.Array, slot: jax.Array, num_shards: int,
          capacity: int, fill) -> jax.Array:
    """(A, ...) values -> (num_shards, capacity, ...) send buffer; unsent slots hold `fill`."""
    buffer = jnp.full((num_shards, capacity, *values.shape[1:]), fill, values.dtype)
    return buffer.at[destination, slot].set(values, mode="drop")


def _unpack(buffer: jax.Array, destination: jax.Array, slot: jax.Array, into: jax.Array,
            capacity: int) -> jax.Array:
    """`into` (A, D) with this round's assignments replaced by their rows of `buffer`."""
    sent = (slot < capacity)[:, None]
    return jnp.where(sent, buffer[destination, jnp.minimum(slot, capacity - 1)], into)


def _owner_experts(received: jax.Array, received_expert: jax.Array, w_gate: jax.Array,
                   w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """The owner's experts on the rows it received, (R, D) with int (R,) local expert ids
    (`local_experts` for an empty slot) -> (R, D), in the received order."""
    local_order = jnp.argsort(received_expert, stable=True)
    sizes = jnp.bincount(received_expert, length=w_gate.shape[0]).astype(jnp.int32)
    computed = _grouped_experts(received[local_order], sizes, w_gate, w_up, w_down)
    return jnp.zeros_like(computed).at[local_order].set(computed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _exchange_rounds(axis_name, num_shards: int, capacity: int, rows, local_expert, destination,
                     rank, rounds, w_gate, w_up, w_down):
    """Every assignment's expert output (A, D) for its input rows (A, D), sorted by expert, in
    `rounds` exchanges of (num_shards, capacity) buffers (a loop whose trip count is a device
    value, so a custom VJP: its backward pass is the same rounds, each sending the rows and
    their output gradients to the owner and the input gradients back)."""
    exchange = lambda a: jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True)
    empty = w_gate.shape[0]

    def one_round(r, out):
        slot = _round_slots(rank, r, capacity)
        received = exchange(_pack(rows, destination, slot, num_shards, capacity, 0))
        received_expert = exchange(_pack(local_expert, destination, slot, num_shards, capacity,
                                         empty))
        computed = _owner_experts(received.reshape(-1, rows.shape[-1]), received_expert.ravel(),
                                  w_gate, w_up, w_down)
        returned = exchange(computed.reshape(num_shards, capacity, -1))
        return _unpack(returned, destination, slot, out, capacity)

    return jax.lax.fori_loop(0, rounds, one_round, jnp.zeros_like(rows))


def _exchange_rounds_forward(axis_name, num_shards, capacity, rows, local_expert, destination,
                             rank, rounds, w_gate, w_up, w_down):
    out = _exchange_rounds(axis_name, num_shards, capacity, rows, local_expert, destination,
                           rank, rounds, w_gate, w_up, w_down)
    return out, (rows, local_expert, destination, rank, rounds, w_gate, w_up, w_down)


def _exchange_rounds_backward(axis_name, num_shards, capacity, residuals, cotangent):
    rows, local_expert, destination, rank, rounds, w_gate, w_up, w_down = residuals
    exchange = lambda a: jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True)
    weights = (w_gate, w_up, w_down)
    width = rows.shape[-1]

    def one_round(r, carry):
        d_rows, d_weights = carry
        slot = _round_slots(rank, r, capacity)
        pack = lambda v, fill=0: exchange(_pack(v, destination, slot, num_shards, capacity, fill))
        received = pack(rows).reshape(-1, width)
        received_cotangent = pack(cotangent).reshape(-1, width)
        received_expert = pack(local_expert, w_gate.shape[0]).ravel()
        _, pullback = jax.vjp(lambda x, *w: _owner_experts(x, received_expert, *w), received,
                              *weights)
        d_received, *d_round = pullback(received_cotangent)
        d_weights = tuple(acc + d.astype(jnp.float32) for acc, d in zip(d_weights, d_round))
        returned = exchange(d_received.reshape(num_shards, capacity, width))
        return _unpack(returned, destination, slot, d_rows, capacity), d_weights

    zeros = tuple(jnp.zeros(w.shape, jnp.float32) for w in weights)
    d_rows, d_weights = jax.lax.fori_loop(0, rounds, one_round, (jnp.zeros_like(rows), zeros))
    d_weights = tuple(d.astype(w.dtype) for d, w in zip(d_weights, weights))
    return (d_rows, None, None, None, None, *d_weights)


_exchange_rounds.defvjp(_exchange_rounds_forward, _exchange_rounds_backward)


def routed_experts(x: jax.Array, router_kernel: jax.Array, bias: jax.Array, w_gate: jax.Array,
                   w_up: jax.Array, w_down: jax.Array, config: MoEConfig, *,
                   batch_axes: tuple[str, ...] = (), expert_axes: tuple[str, ...] = ()
                   ) -> tuple[jax.Array, jax.Array]:
    """Routing and dispatch of one shard's tokens (the whole batch on one device).

    Inside `shard_map` the axes name the mesh axes that split the batch and the experts; with
    none (the default) this is the single-device computation.

    Args:
      x: (T, D) tokens; router_kernel: (D, E); bias: (E,);
      w_gate, w_up: (E', D, F'); w_down: (E', F', D): the experts this shard holds
        (E' = E / expert shards), F' <= F of their hidden units.

    Returns:
      out: (T, D) the routed experts' output (summed over the F' hidden units held here);
      load: float32 (E,) assignments per expert summed over the batch shards.
    """
    weights, experts = route(x, router_kernel, bias, config.top_k, config.routed_scale)
    load = expert_counts(experts, config.num_routed_experts)
    if batch_axes:
        load = jax.lax.psum(load, batch_axes)
    num_shards = config.num_routed_experts // w_gate.shape[0]
    tokens, k = experts.shape
    args = (x, experts, weights, w_gate, w_up, w_down)
    if config.capacity_factor is not None:
        capacity = expert_capacity(tokens, k, config.num_routed_experts, config.capacity_factor)
        if num_shards == 1:
            return dispatch_with_capacity(*args, capacity), load
        # Per-expert capacity first, so the exchange cannot overflow.
        return exchange_dispatch(*args, axis_name=expert_axes, num_shards=num_shards,
                                 capacity=capacity * w_gate.shape[0],
                                 per_expert_capacity=capacity), load
    if num_shards == 1:
        return dispatch_dropless(*args), load
    return _exact_exchange(args, expert_axes, num_shards, config.exchange_capacity), load


def sharded_moe(x: jax.Array, router_kernel: jax.Array, bias: jax.Array, w_gate: jax.Array,
                w_up: jax.Array, w_down: jax.Array, config: MoEConfig
                ) -> tuple[jax.Array, jax.Array]:
    """`routed_experts` on the active mesh, in `shard_map`: each batch shard routes and
    dispatches its own tokens. Arguments and results as `routed_experts`, with full shapes
    (x split over the batch axes, the weights laid out by their logical axes).

    The weights enter in their parameter layout and are all-gathered over the `embed` axes
    inside the map, so that their gradients are reduce-scattered back to it (not all-reduced at
    full size). Where the experts' hidden units are split (`tensor`), each shard's partial
    output comes out stacked along a leading axis and is summed outside the map, so the compiler
    both reduces it and transposes it for the gradient.
    """
    batch_axes, tensor_axes = mesh_axes_of(BATCH), mesh_axes_of(EXPERT_MLP)
    embed_axes = mesh_axes_of(EMBED)

    def per_shard(x, router_kernel, bias, w_gate, w_up, w_down):
        if embed_axes:  # FSDP inside the map: its transpose reduce-scatters the gradients
            gather = lambda w, axis: jax.lax.all_gather(w, embed_axes, axis=axis, tiled=True)
            router_kernel, w_gate, w_up = (gather(router_kernel, 0), gather(w_gate, 1),
                                           gather(w_up, 1))
            w_down = gather(w_down, 2)
        out, load = routed_experts(x, router_kernel, bias, w_gate, w_up, w_down, config,
                                   batch_axes=batch_axes, expert_axes=mesh_axes_of(EXPERTS))
        return out[None], load

    expert_weight = logical_spec((EXPERTS, EMBED, EXPERT_MLP))
    # check_vma=False: the TPU kernels (Pallas) declare no per-axis variance.
    partials, load = jax.shard_map(
        per_shard, check_vma=False,
        in_specs=(logical_spec((BATCH, None)), logical_spec((EMBED, None)), logical_spec((None,)),
                  expert_weight, expert_weight, logical_spec((EXPERTS, EXPERT_MLP, EMBED))),
        out_specs=(jax.sharding.PartitionSpec(tensor_axes or None, batch_axes or None, None),
                   logical_spec((None,))),
    )(x, router_kernel, bias, w_gate, w_up, w_down)
    return jnp.sum(partials, axis=0), load


def _exact_exchange(args: tuple, axis_name: tuple[str, ...], num_shards: int,
                    capacity_factor: float) -> jax.Array:
    """Dropless `exchange_dispatch` with buffers of `capacity_factor` x the balanced load per
    destination (more rounds when a destination gets more)."""
    assignments = args[1].size
    capacity = min(assignments, math.ceil(capacity_factor * assignments / num_shards))
    return exchange_dispatch(*args, axis_name=axis_name, num_shards=num_shards,
                             capacity=capacity)


class MoE(nnx.Module):
    """DeepSeekMoE FFN: (B, L, D) -> (B, L, D).

    Each call adds the tokens routed to each expert to `expert_load`; `update_bias` turns that
    load into a balancing-bias step and resets it.
    """

    def __init__(self, width: int, config: MoEConfig, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        e, d, f = config.num_routed_experts, width, config.expert_hidden_size
        self.router_kernel = logical_param(scaled_normal(d), rngs.params(), (d, e), param_dtype,
                                           (EMBED, None))
        self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32))
        self.expert_load = ExpertLoad(jnp.zeros((e,), jnp.float32))
        self.w_gate = logical_param(scaled_normal(d), rngs.params(), (e, d, f), param_dtype,
                                    (EXPERTS, EMBED, EXPERT_MLP))
        self.w_up = logical_param(scaled_normal(d), rngs.params(), (e, d, f), param_dtype,
                                  (EXPERTS, EMBED, EXPERT_MLP))
        self.w_down = logical_param(scaled_normal(f), rngs.params(), (e, f, d), param_dtype,
                                    (EXPERTS, EXPERT_MLP, EMBED))
        self.shared = (SwiGLU(d, config.num_shared_experts * f, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
                       if config.num_shared_experts else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch_shape, width = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, width).astype(self.dtype)
        cast = lambda w: w[...].astype(self.dtype)
        experts = (cast(self.w_gate), cast(self.w_up), cast(self.w_down))
        if not jax.sharding.get_abstract_mesh().empty:
            out, load = sharded_moe(flat, self.router_kernel[...], self.router_bias[...],
                                    *experts, self.config)
        else:
            out, load = routed_experts(flat, self.router_kernel[...], self.router_bias[...],
                                       *experts, self.config)
        self.expert_load[...] += load
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.reshape(*batch_shape, width)

    def update_bias(self) -> None:
        """One balancing step from the load gathered since the last one; resets the load."""
        self.router_bias[...] = balance_bias_update(self.router_bias[...], self.expert_load[...],
                                                    self.config.bias_update_rate)
        self.expert_load[...] = jnp.zeros_like(self.expert_load[...])
