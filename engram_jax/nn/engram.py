"""The Engram module: pure functions for the math, an NNX module for the parameters.

The steps and the equations they follow (the paper's §2 and the reference demo) are in
docs/ARCHITECTURE.md, "The Engram module".

Shapes: B batch, L length, G residual streams (hc_mult), D hidden width, K hash heads per layer
((N-1) * H), E = (N-1) * n_embed_per_ngram the width of the concatenated lookup.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.config.schema import EngramConfig
from engram_jax.nn.normalization import rms_norm
from engram_jax.nn.params import logical_param
from engram_jax.sharding.axes import (CONV_TAPS, EMBED, ENGRAM_COLS, ENGRAM_EMBED, ENGRAM_ROWS,
                                      HC_STREAMS)
from engram_jax.sharding.lookup import table_lookup, table_shards
from engram_jax.table_layout import table_layout

# The reference leaves the gate RMSNorms' eps unset, so PyTorch uses the input dtype's machine
# epsilon; the gate is computed in float32, so that is float32's.
GATE_NORM_EPS = float(np.finfo(np.float32).eps)
CONV_NORM_EPS = 1e-5
GATE_SQRT_FLOOR = 1e-6

def lookup_embeddings(table: jax.Array, offsets: jax.Array, hash_ids: jax.Array,
                      mode: str = "all_to_all", capacity_factor: float = 0.75) -> jax.Array:
    """Gathers and concatenates each head's row.

    Args:
      table: (sum of head sizes, head_dim) rows of all heads.
      offsets: int32 (K,) first row of each head.
      hash_ids: int32 (B, L, K) row ids within each head.
      mode: "all_to_all", "routed" or "auto" (`EngramConfig.lookup`), and its
        `capacity_factor` (`EngramConfig.lookup_capacity`).

    Returns:
      (B, L, K * head_dim), heads in column order. Under a mesh whose rules split the table's
      rows, devices read the rows they own for others (`sharding.lookup.table_lookup`).
    """
    rows = table_lookup(table, hash_ids + offsets, mode, capacity_factor)  # (B, L, K, head_dim)
    return rows.reshape(*hash_ids.shape[:-1], -1)


def signed_sqrt(s: jax.Array) -> jax.Array:
    """sign(s) * sqrt(max(|s|, 1e-6)), the reference's gate squashing."""
    return jnp.sqrt(jnp.maximum(jnp.abs(s), GATE_SQRT_FLOOR)) * jnp.sign(s)


def engram_gate(keys: jax.Array, queries: jax.Array, key_scale: jax.Array,
                query_scale: jax.Array) -> jax.Array:
    """Per-token, per-stream gate in (0, 1), computed in float32.

    Args:
      keys: (B, L, G, D) projected memory, one key per stream.
      queries: (B, L, G, D) hidden states of each stream.
      key_scale, query_scale: (G, D) RMSNorm gains.

    Returns:
      float32 (B, L, G): sigmoid(signed_sqrt(<norm(k), norm(q)> / sqrt(D))).
    """
    dim = keys.shape[-1]
    score = jnp.sum(rms_norm(keys, key_scale, GATE_NORM_EPS)
                    * rms_norm(queries, query_scale, GATE_NORM_EPS), axis=-1) / np.sqrt(dim)
    return jax.nn.sigmoid(signed_sqrt(score))


def causal_depthwise_conv(x: jax.Array, kernel: jax.Array, dilation: int,
                          segment_ids: jax.Array | None = None) -> jax.Array:
    """Depthwise causal 1-D convolution over the length axis, no bias.

    Args:
      x: (B, L, ...channels).
      kernel: (taps, ...channels); tap i reads x[t - (taps - 1 - i) * dilation], so the last tap
        reads the current position (PyTorch's Conv1d layout with left padding).
      dilation: spacing between taps.
      segment_ids: int (B, L) or None; a tap reading another segment (the previous packed
        document) reads zero, as before the sequence start.

    Returns:
      Same shape as x.
    """
    taps, length = kernel.shape[0], x.shape[1]
    out = jnp.zeros_like(x)
    shift_right = lambda a, shift: jnp.pad(a[:, :length - shift],
                                           [(0, 0), (shift, 0)] + [(0, 0)] * (a.ndim - 2))
    for i in range(taps):
        shift = (taps - 1 - i) * dilation
        if shift >= length:
            continue
        shifted = shift_right(x, shift)
        if segment_ids is not None and shift:
            same = shift_right(segment_ids, shift) == segment_ids  # padded taps read 0 anyway
            shifted = jnp.where(same.reshape(same.shape + (1,) * (x.ndim - 2)), shifted, 0)
        out = out + shifted * kernel[i]
    return out


def short_conv(value: jax.Array, norm_scale: jax.Array, kernel: jax.Array,
               dilation: int, segment_ids: jax.Array | None = None) -> jax.Array:
    """SiLU(conv(RMSNorm_per_stream(value))), in float32.

    Args:
      value: (B, L, G, D) gated value.
      norm_scale: (G, D) per-stream RMSNorm gains (eps 1e-5).
      kernel: (taps, G, D) depthwise kernel.
      dilation: tap spacing (the reference uses N, the largest n-gram order).
      segment_ids: int (B, L) or None: taps stay within each segment.
    """
    normed = rms_norm(value, norm_scale, CONV_NORM_EPS)
    return jax.nn.silu(causal_depthwise_conv(normed, kernel.astype(jnp.float32), dilation,
                                             segment_ids))


def init_table(key: jax.Array, shape: tuple[int, int],
               dtype: jax.typing.DTypeLike = jnp.float32) -> jax.Array:
    """A table's initial rows: standard normal (the reference's nn.Embedding init)."""
    return jax.random.normal(key, shape, dtype)


class TableKey(nnx.Variable):
    """The raw key (`jax.random.key_data`) a host-resident table is drawn from
    (`engram.table_placement: host`), so that it starts as the device table would."""


class GateMean(nnx.Variable):
    """Mean gate per stream (G,) of the last call, for metrics; not a parameter."""


class Engram(nnx.Module):
    """Hashed n-gram memory with per-stream gating (one Engram layer).

    Args:
      config: Engram settings (shared by all Engram layers of a model).
      layer_id: which of `config.layer_ids` this is; picks the layer's table sizes.
      hidden_size: D, the width of each residual stream.
      hc_mult: G, the number of residual streams.
      dtype: compute dtype of the lookup, projections and output.
      param_dtype: storage dtype of the parameters.
      rngs: parameter initialisation keys.

    Call with hidden states (B, L, G, D), int32 hash ids (B, L, K) from `NgramHasher` and, for
    packed documents kept apart, segment ids (B, L); returns Y (B, L, G, D), the term the block
    adds to every stream.
    """

    def __init__(self, config: EngramConfig, layer_id: int, hidden_size: int, hc_mult: int, *,
                 dtype: jax.typing.DTypeLike = jnp.float32,
                 param_dtype: jax.typing.DTypeLike = jnp.float32, rngs: nnx.Rngs):
        if layer_id not in config.layer_ids:
            raise ValueError(f"layer_id={layer_id} is not in engram.layer_ids={config.layer_ids}")
        self.config = config
        self.layer_id = layer_id
        self.hidden_size = hidden_size
        self.hc_mult = hc_mult
        self.dtype = dtype
        self.layout = table_layout(config)[layer_id]
        e, d, g = config.embed_dim, hidden_size, hc_mult
        # PyTorch's default Linear init (uniform, bound 1/sqrt(fan_in)); biases start at zero.
        linear_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-2,
                                                        out_axis=-1)
        zeros, ones = nnx.initializers.zeros, nnx.initializers.ones
        table_shards(self.layout.padded_rows)  # under a mesh: the rows must split evenly
        table_key = rngs.params()
        rows = self.layout.padded_rows
        if config.table_placement == "host":  # drawn on the host from the same key
            self.table_key = TableKey(jax.random.key_data(table_key))
            rows = 0
        self.table = logical_param(init_table, table_key, (rows, config.head_dim), param_dtype,
                                   (ENGRAM_ROWS, ENGRAM_COLS))
        if config.gated:
            self.key_kernel = logical_param(linear_init, rngs.params(), (g, e, d), param_dtype,
                                            (HC_STREAMS, ENGRAM_EMBED, EMBED))
            self.key_bias = logical_param(zeros, rngs.params(), (g, d), param_dtype,
                                          (HC_STREAMS, EMBED))
            self.key_norm = logical_param(ones, rngs.params(), (g, d), param_dtype,
                                          (HC_STREAMS, EMBED))
            self.query_norm = logical_param(ones, rngs.params(), (g, d), param_dtype,
                                            (HC_STREAMS, EMBED))
        self.value_kernel = logical_param(linear_init, rngs.params(), (e, d), param_dtype,
                                          (ENGRAM_EMBED, EMBED))
        self.value_bias = logical_param(zeros, rngs.params(), (d,), param_dtype, (EMBED,))
        if config.short_conv:
            self.conv_norm = logical_param(ones, rngs.params(), (g, d), param_dtype,
                                           (HC_STREAMS, EMBED))
            # PyTorch's default depthwise Conv1d init has bound 1/sqrt(taps); the paper starts
            # at 0.
            conv_init = zeros if config.conv_zero_init else nnx.initializers.variance_scaling(
                1 / 3, "fan_in", "uniform", in_axis=0, out_axis=())
            self.conv_kernel = logical_param(conv_init, rngs.params(), (config.kernel_size, g, d),
                                             param_dtype, (CONV_TAPS, HC_STREAMS, EMBED))
        self.gate_mean = GateMean(jnp.full((g,), 0.5, jnp.float32))

    def embed(self, hash_ids: jax.Array) -> jax.Array:
        """(B, L, K) int32 hash ids -> (B, L, E) concatenated table rows in the compute dtype."""
        heads = len(self.layout.head_sizes)
        if hash_ids.shape[-1] != heads:
            raise ValueError(f"hash ids have {hash_ids.shape[-1]} heads, layer {self.layer_id} "
                             f"has {heads}")
        if self.config.table_placement == "host":
            raise ValueError(f"layer {self.layer_id}'s table lives on the host "
                             "(engram.table_placement: host): pass its rows, gathered there")
        offsets = jnp.asarray(self.layout.offsets, dtype=jnp.int32)
        return lookup_embeddings(self.table[...], offsets, hash_ids, self.config.lookup,
                                 self.config.lookup_capacity).astype(self.dtype)

    def gates(self, hidden: jax.Array, memory: jax.Array) -> jax.Array:
        """float32 (B, L, G) gates from hidden states (B, L, G, D) and memory (B, L, E); all
        ones when the config has `gated: false`."""
        if not self.config.gated:
            return jnp.ones(hidden.shape[:3], jnp.float32)
        keys = jnp.einsum("ble,ged->blgd", memory, self.key_kernel[...].astype(self.dtype))
        keys = keys + self.key_bias[...].astype(self.dtype)
        return engram_gate(keys, hidden, self.key_norm[...], self.query_norm[...])

    def _check(self, hidden: jax.Array, ids_or_rows: jax.Array) -> None:
        if hidden.ndim != 4 or hidden.shape[2:] != (self.hc_mult, self.hidden_size):
            raise ValueError(f"hidden states must be (batch, length, {self.hc_mult}, "
                             f"{self.hidden_size}), got {hidden.shape}")
        if ids_or_rows.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"hash ids or rows {ids_or_rows.shape} and hidden states "
                             f"{hidden.shape} differ in batch or length")

    def _gated_value(self, hidden: jax.Array, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
        """float32 (B, L, G, D) gate x value of hidden states (B, L, G, D), memory (B, L, E),
        and the float32 (B, L, G) gates."""
        gate = self.gates(hidden, memory)
        value = memory @ self.value_kernel[...].astype(self.dtype) + self.value_bias[...].astype(
            self.dtype)
        return gate[..., None] * value[:, :, None, :].astype(jnp.float32), gate

    @property
    def conv_span(self) -> int:
        """Past positions the short convolution reads: (kernel_size - 1) x dilation (0 without
        the convolution)."""
        if not self.config.short_conv:
            return 0
        return (self.config.kernel_size - 1) * self.config.dilation

    def term(self, hidden: jax.Array, memory: jax.Array,
             segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Y (B, L, G, D) and the float32 (B, L, G) gates from the looked-up rows `memory`
        (B, L, E) (`embed`), changing no state (for use under `lax.switch`); `__call__` looks
        the rows up and also records the gates' mean in `gate_mean`."""
        self._check(hidden, memory)
        gated, gate = self._gated_value(hidden, memory)
        if self.config.short_conv:
            gated = gated + short_conv(gated, self.conv_norm[...], self.conv_kernel[...],
                                       self.config.dilation, segment_ids)
        return gated.astype(self.dtype), gate

    def __call__(self, hidden: jax.Array, hash_ids: jax.Array,
                 segment_ids: jax.Array | None = None,
                 rows: jax.Array | None = None) -> jax.Array:
        """Y (B, L, G, D) of hidden states (B, L, G, D) and hash ids int32 (B, L, K); `rows`
        (B, L, E), the ids' rows gathered by the caller (`embed`), stand in for the table (a
        row-sparse optimiser differentiates with respect to them)."""
        self._check(hidden, hash_ids)
        memory = self.embed(hash_ids) if rows is None else rows.astype(self.dtype)
        y, gate = self.term(hidden, memory, segment_ids)
        self.gate_mean[...] = jnp.mean(gate, axis=(0, 1))  # overwritten each call: no retrace
        return y

    def extend(self, hidden: jax.Array, hash_ids: jax.Array, history: jax.Array,
               added: jax.Array, rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Y of new tokens, for decoding: the short convolution also reads the positions before.

        Args:
          hidden: (B, L, G, D) hidden states and hash_ids int32 (B, L, K) of the new tokens.
          history: float32 (B, conv_span, G, D) the convolution's normalised inputs at the
            conv_span positions before them (zeros before the sequence start).
          added: int (B,) how many of the L tokens each row keeps (the rest are padding).
          rows: (B, L, E) the tokens' table rows when the caller gathered them (tables in host
            memory), else None: looked up here.

        Returns:
          Y (B, L, G, D) and the history after each row's first `added` tokens. Changes no
          state.
        """
        self._check(hidden, hash_ids if rows is None else rows)
        memory = self.embed(hash_ids) if rows is None else rows.astype(self.dtype)
        gated, _ = self._gated_value(hidden, memory)
        if not self.config.short_conv:
            return gated.astype(self.dtype), history
        normed = rms_norm(gated, self.conv_norm[...], CONV_NORM_EPS)
        inputs = jnp.concatenate([history.astype(jnp.float32), normed], axis=1)
        span = history.shape[1]
        conv = jax.nn.silu(causal_depthwise_conv(
            inputs, self.conv_kernel[...].astype(jnp.float32), self.config.dilation))[:, span:]
        history = jax.vmap(lambda a, start: jax.lax.dynamic_slice_in_dim(a, start, span))(
            inputs, added)
        return (gated + conv).astype(self.dtype), history
