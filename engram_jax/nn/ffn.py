"""The dense SwiGLU feed-forward layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.nn.params import logical_param, scaled_normal
from engram_jax.sharding.axes import EMBED, MLP


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """(silu(x W_gate) * x W_up) W_down: (..., D) -> (..., D)."""
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


class SwiGLU(nnx.Module):
    """Dense SwiGLU FFN of hidden width `hidden`."""

    def __init__(self, width: int, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.w_gate = logical_param(scaled_normal(width), rngs.params(), (width, hidden),
                                    param_dtype, (EMBED, MLP))
        self.w_up = logical_param(scaled_normal(width), rngs.params(), (width, hidden),
                                  param_dtype, (EMBED, MLP))
        self.w_down = logical_param(scaled_normal(hidden), rngs.params(), (hidden, width),
                                    param_dtype, (MLP, EMBED))

    def __call__(self, x: jax.Array) -> jax.Array:
        cast = lambda w: w[...].astype(self.dtype)
        return swiglu(x.astype(self.dtype), cast(self.w_gate), cast(self.w_up), cast(self.w_down))
