"""RMS normalisation: the pure function and a module with a learned gain."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.nn.params import logical_param
from engram_jax.sharding.axes import EMBED


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float) -> jax.Array:
    """RMS normalisation over the last axis, in float32; `scale` None means no gain."""
    x = x.astype(jnp.float32)
    out = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return out if scale is None else out * scale.astype(jnp.float32)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (width `dim`), gain initialised to 1, output in `dtype`."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 axis_name: str = EMBED, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = logical_param(nnx.initializers.ones, rngs.params(), (dim,), param_dtype,
                                   (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps).astype(self.dtype)
