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
fixed buffers of `exchange_capacity` times the balanced load per destination; a step in which any
buffer would overflow takes a full-size exchange instead, so dropless stays exact. Load counts
are summed over the batch shards, so balancing sees the global load.

Shapes: T tokens, D width, E routed experts, F expert hidden width, k = top_k.
"""

from __future__ import annotations

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
    grouped-matmul kernels of jax's Pallas ops, whose gradients are grouped too.
    """
    return jax.lax.platform_dependent(x, w, sizes, tpu=_megablox_matmul,
                                      default=jax.lax.ragged_dot)


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

    The shard sorts its assignments by expert (so by destination shard), packs at most `capacity`
    per destination into a (num_shards, capacity, D) buffer, and `all_to_all` delivers them; the
    owner runs its experts on what it received and the reverse `all_to_all` brings the rows back.
    Assignments past a destination's `capacity`, or past the first `per_expert_capacity` of their
    expert in this shard's token order (capacity mode), give nothing: dropless callers choose
    `capacity` so that none overflows.

    Args:
      x: (T, D) this shard's tokens; experts: int (T, k) global expert ids; weights: (T, k);
      w_gate, w_up: (E / num_shards, D, F) this shard's experts; w_down: (E / num_shards, F, D);
      per_expert_capacity: assignments each expert keeps from this shard, or None (all).

    Returns:
      (T, D): each token's weighted sum of its experts' outputs.
    """
    local_experts, width = w_gate.shape[0], x.shape[-1]
    order, sorted_experts, sizes = _sort_by_expert(experts, local_experts * num_shards)
    destination = sorted_experts // local_experts
    kept = jnp.ones_like(destination, bool)
    if per_expert_capacity is not None:  # first come, first kept per expert
        rank_in_expert = jnp.arange(order.shape[0]) - (jnp.cumsum(sizes) - sizes)[sorted_experts]
        kept = rank_in_expert < per_expert_capacity
    per_destination = jnp.zeros(num_shards, jnp.int32).at[destination].add(kept.astype(jnp.int32))
    rank = jnp.cumsum(kept) - 1 - (jnp.cumsum(per_destination) - per_destination)[destination]
    slot = jnp.where(kept, rank, capacity)  # out of bounds: not sent
    send = jnp.zeros((num_shards, capacity, width), x.dtype).at[destination, slot].set(
        x[order // experts.shape[1]], mode="drop")
    # Slots that hold nothing name expert `local_experts`, which sorts after every real one.
    send_expert = jnp.full((num_shards, capacity), local_experts, jnp.int32).at[
        destination, slot].set(sorted_experts % local_experts, mode="drop")
    exchange = lambda a: jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True)
    received, received_expert = exchange(send).reshape(-1, width), exchange(send_expert).ravel()
    local_order = jnp.argsort(received_expert, stable=True)
    local_sizes = jnp.bincount(received_expert, length=local_experts).astype(jnp.int32)
    computed = _grouped_experts(received[local_order], local_sizes, w_gate, w_up, w_down)
    unsorted = jnp.zeros_like(computed).at[local_order].set(computed)
    returned = exchange(unsorted.reshape(num_shards, capacity, width))
    sent = slot < capacity
    out_sorted = returned[destination, jnp.minimum(slot, capacity - 1)] * sent[:, None].astype(
        returned.dtype)
    return _combine(out_sorted, order, weights)


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
    """Dropless `exchange_dispatch`: buffers of `capacity_factor` x the balanced load per
    destination, or, when any shard along the axis would overflow one, buffers that hold every
    assignment (the same result, more traffic)."""
    x, experts, _, w_gate = args[:4]
    assignments = experts.size
    capacity = min(assignments, math.ceil(capacity_factor * assignments / num_shards))
    run = lambda c: (lambda a: exchange_dispatch(*a, axis_name=axis_name, num_shards=num_shards,
                                                  capacity=c))
    if capacity == assignments:
        return run(capacity)(args)
    destination = experts.reshape(-1) // w_gate.shape[0]
    busiest = jnp.max(jnp.bincount(destination, length=num_shards))
    overflow = jax.lax.pmax(busiest, axis_name) > capacity
    return jax.lax.cond(overflow, run(assignments), run(capacity), args)


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
