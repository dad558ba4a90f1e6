"""DeepSeekMoE: shared experts plus fine-grained routed experts (docs/ARCHITECTURE.md, "MoE").

Routing: sigmoid affinities; the top-k experts are chosen by affinity + a balancing bias (used for
selection only); the chosen affinities, normalised to sum to 1, weight the experts' outputs.
Auxiliary-loss-free balancing: after each step the bias of every expert moves by
`rate * sign(mean load - its load)`.

Dispatch is dropless by default: assignments are sorted by expert and each expert multiplies its
contiguous group (`jax.lax.ragged_dot`). A capacity-factor mode (fixed per-expert buffers, overflow
dropped) is available for platforms where fixed shapes are preferable.

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
from engram_jax.sharding.axes import EMBED, EXPERT_MLP, EXPERTS


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
    """bias + rate * sign(mean(load) - load): under-loaded experts become more likely."""
    return bias + rate * jnp.sign(jnp.mean(load) - load).astype(bias.dtype)


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
    xs = x[order // k]
    hidden = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, sizes)) * jax.lax.ragged_dot(
        xs, w_up, sizes)
    return _combine(jax.lax.ragged_dot(hidden, w_down, sizes), order, weights)


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
        weights, experts = route(flat, self.router_kernel[...], self.router_bias[...],
                                 self.config.top_k, self.config.routed_scale)
        self.expert_load[...] += expert_counts(experts, self.config.num_routed_experts)
        cast = lambda w: w[...].astype(self.dtype)
        args = (flat, experts, weights, cast(self.w_gate), cast(self.w_up), cast(self.w_down))
        if self.config.capacity_factor is None:
            out = dispatch_dropless(*args)
        else:
            capacity = expert_capacity(flat.shape[0], self.config.top_k,
                                       self.config.num_routed_experts,
                                       self.config.capacity_factor)
            out = dispatch_with_capacity(*args, capacity)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.reshape(*batch_shape, width)

    def update_bias(self) -> None:
        """One balancing step from the load gathered since the last one; resets the load."""
        self.router_bias[...] = balance_bias_update(self.router_bias[...], self.expert_load[...],
                                                    self.config.bias_update_rate)
        self.expert_load[...] = jnp.zeros_like(self.expert_load[...])
