"""Causal self-attention with RoPE, MHA or GQA, through `jax.nn.dot_product_attention`.

Shapes: B batch, L length, D width, N query heads, K key/value heads (N % K == 0), H head width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.nn.params import logical_param, scaled_normal
from engram_jax.sharding.axes import EMBED, HEAD_DIM, KV_HEADS, Q_HEADS


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half layout).

    Args:
      x: (B, L, heads, H) with H even.
      positions: int (B, L) position of each token.
      theta: RoPE base.
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # (B, L, 1, half)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nnx.Module):
    """Causal multi-head (or grouped-query) attention with RoPE.

    The platform picks the kernel: cuDNN flash attention on GPUs for bf16/fp16, XLA elsewhere.
    """

    def __init__(self, width: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope_theta: float, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.rope_theta = rope_theta
        self.dtype = dtype
        d, n, k, h = width, num_heads, num_kv_heads, head_dim
        self.wq = logical_param(scaled_normal(d), rngs.params(), (d, n, h), param_dtype,
                                (EMBED, Q_HEADS, HEAD_DIM))
        self.wk = logical_param(scaled_normal(d), rngs.params(), (d, k, h), param_dtype,
                                (EMBED, KV_HEADS, HEAD_DIM))
        self.wv = logical_param(scaled_normal(d), rngs.params(), (d, k, h), param_dtype,
                                (EMBED, KV_HEADS, HEAD_DIM))
        self.wo = logical_param(scaled_normal(n * h), rngs.params(), (n, h, d), param_dtype,
                                (Q_HEADS, HEAD_DIM, EMBED))

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x (B, L, D), positions int (B, L) -> (B, L, D)."""
        x = x.astype(self.dtype)
        cast = lambda w: w[...].astype(self.dtype)
        q = apply_rope(jnp.einsum("bld,dnh->blnh", x, cast(self.wq)), positions, self.rope_theta)
        k = apply_rope(jnp.einsum("bld,dkh->blkh", x, cast(self.wk)), positions, self.rope_theta)
        v = jnp.einsum("bld,dkh->blkh", x, cast(self.wv))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return jnp.einsum("blnh,nhd->bld", out, cast(self.wo))
