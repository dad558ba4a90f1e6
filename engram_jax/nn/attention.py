"""Causal self-attention with RoPE, MHA or GQA, on the platform's kernel.

Shapes: B batch, L length, D width, N query heads, K key/value heads (N % K == 0), H head width.

Kernels (`model.attention`; "auto" picks by the platform of the mesh in force, else of the
default backend):
  xla     `jax.nn.dot_product_attention(implementation="xla")`: builds the (B, N, L, L) scores.
  cudnn   cuDNN flash attention (GPU, bf16 or fp16).
  splash  the Pallas splash-attention kernel (TPU): blocks of the causal and document masks that
          are all masked are skipped, and the scores never leave the chip's vector memory. Run
          per batch and head shard in a `jax.shard_map`, since the compiler cannot partition a
          Pallas call.
With segment ids (B, L) a query attends only to keys of its own segment (packed documents).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from engram_jax.nn.params import logical_param, scaled_normal
from engram_jax.sharding.axes import BATCH, EMBED, HEAD_DIM, KV_HEADS, Q_HEADS
from engram_jax.sharding.mesh import logical_spec

# The splash kernel works on blocks of 128 lanes: lengths must be a multiple of it.
SPLASH_MULTIPLE = 128
SPLASH_BLOCK = 512


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


def resolve_kernel(kernel: str, dtype: jax.typing.DTypeLike, length: int) -> str:
    """The kernel `kernel` ("auto" or a name) means for this call: "auto" takes splash on TPU
    (lengths a multiple of 128), cuDNN on GPU (bf16/fp16), XLA otherwise."""
    if kernel != "auto":
        return kernel
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = device.platform if device is not None else jax.default_backend()
    if platform == "tpu" and length % SPLASH_MULTIPLE == 0:
        return "splash"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """bool (B, 1, L, L): query t may read key s of the same segment."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     segment_ids: jax.Array | None, *, interpret: bool = False) -> jax.Array:
    """Causal attention through the splash kernel, on one device's shard.

    Args:
      q: (B, L, N, H) queries; k, v: (B, L, K, H).
      segment_ids: int (B, L) or None.
      interpret: run the kernel in Pallas's interpreter (CPU tests).

    Returns:
      (B, L, N, H).
    """
    batch, length, heads, width = q.shape
    if length % SPLASH_MULTIPLE:
        raise ValueError(f"the splash kernel needs a length that is a multiple of "
                         f"{SPLASH_MULTIPLE}, got {length} (set model.attention: xla)")
    block = max(b for b in (SPLASH_BLOCK, 256, SPLASH_MULTIPLE) if length % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block,
                              block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # (B, L, heads, H) -> (B, heads, L, H)
    q = heads_first(q * jnp.asarray(1.0 / np.sqrt(width), q.dtype))
    if segment_ids is None:
        out = jax.vmap(kernel)(q, heads_first(k), heads_first(v))
    else:
        segments = splash.SegmentIds(q=segment_ids.astype(jnp.int32),
                                     kv=segment_ids.astype(jnp.int32))
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(
            q, heads_first(k), heads_first(v), segments)
    return heads_first(out)


def sharded_splash_attention(q, k, v, segment_ids, *, interpret: bool = False) -> jax.Array:
    """`splash_attention` on every batch and head shard of the mesh in force (directly without
    one); shapes as there."""
    run = functools.partial(splash_attention, interpret=interpret)
    if jax.sharding.get_abstract_mesh().empty:
        return run(q, k, v, segment_ids)
    heads = lambda kind: logical_spec((BATCH, None, kind, HEAD_DIM))
    rows = logical_spec((BATCH, None))
    if segment_ids is None:
        return jax.shard_map(lambda q, k, v: run(q, k, v, None), check_vma=False,
                             in_specs=(heads(Q_HEADS), heads(KV_HEADS), heads(KV_HEADS)),
                             out_specs=heads(Q_HEADS))(q, k, v)
    return jax.shard_map(run, check_vma=False,
                         in_specs=(heads(Q_HEADS), heads(KV_HEADS), heads(KV_HEADS), rows),
                         out_specs=heads(Q_HEADS))(q, k, v, segment_ids)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                     kernel: str) -> jax.Array:
    """Causal (and, with segment ids, within-segment) attention, scaled by 1/sqrt(H).

    Args:
      q: (B, L, N, H); k, v: (B, L, K, H).
      segment_ids: int (B, L) or None.
      kernel: "xla", "cudnn" or "splash" (`resolve_kernel` turns "auto" into one of them).

    Returns:
      (B, L, N, H).
    """
    if kernel == "splash":
        return sharded_splash_attention(q, k, v, segment_ids)
    if kernel not in ("xla", "cudnn"):
        raise ValueError(f"unknown attention kernel {kernel!r}")
    mask = None if segment_ids is None else segment_mask(segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                        implementation=kernel)


class Attention(nnx.Module):
    """Causal multi-head (or grouped-query) attention with RoPE, on `kernel` (see the module
    docstring)."""

    def __init__(self, width: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope_theta: float, *, kernel: str = "auto", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.rope_theta = rope_theta
        self.kernel = kernel
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

    def _project(self, x: jax.Array, positions: jax.Array):
        """x (B, L, D) -> q (B, L, N, H), k, v (B, L, K, H), RoPE applied to q and k."""
        x = x.astype(self.dtype)
        cast = lambda w: w[...].astype(self.dtype)
        q = apply_rope(jnp.einsum("bld,dnh->blnh", x, cast(self.wq)), positions, self.rope_theta)
        k = apply_rope(jnp.einsum("bld,dkh->blkh", x, cast(self.wk)), positions, self.rope_theta)
        return q, k, jnp.einsum("bld,dkh->blkh", x, cast(self.wv))

    def _output(self, out: jax.Array) -> jax.Array:
        return jnp.einsum("blnh,nhd->bld", out, self.wo[...].astype(self.dtype))

    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """x (B, L, D), positions int (B, L), segment ids int (B, L) or None -> (B, L, D)."""
        q, k, v = self._project(x, positions)
        kernel = resolve_kernel(self.kernel, self.dtype, x.shape[1])
        return self._output(causal_attention(q, k, v, segment_ids, kernel))

    def extend(self, x: jax.Array, positions: jax.Array, cache: dict
               ) -> tuple[jax.Array, dict]:
        """Attention of new tokens over a KV cache, for decoding.

        Args:
          x: (B, L, D) the new tokens' inputs, at int positions (B, L): row b's tokens are at
            positions[b, 0] + 0..L-1 and are written to the cache there.
          cache: {"k": (B, S, K, H), "v": (B, S, K, H)}, entries below positions[:, 0] filled.

        Returns:
          (B, L, D), and the cache with the new keys and values written. Position t reads the
          cache entries 0..t (XLA's kernel).
        """
        q, k, v = self._project(x, positions)
        write = jax.vmap(lambda c, new, start: jax.lax.dynamic_update_slice_in_dim(
            c, new.astype(c.dtype), start, axis=0))
        starts = positions[:, 0]
        cache = {"k": write(cache["k"], k, starts), "v": write(cache["v"], v, starts)}
        visible = jnp.arange(cache["k"].shape[1])[None, None, :] <= positions[:, :, None]
        out = jax.nn.dot_product_attention(q, cache["k"].astype(q.dtype),
                                           cache["v"].astype(q.dtype), mask=visible[:, None],
                                           implementation="xla")
        return self._output(out), cache
