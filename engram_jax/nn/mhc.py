"""Manifold-constrained hyper-connections (arXiv 2512.24880; docs/ARCHITECTURE.md, "mHC").

The residual stream is n streams wide: x has shape (B, L, n, C). Around each sublayer F:

  coefficients from x:  x̂ = RMSNorm(flatten(x)) (no gain);  m = x̂ @ phi  (fp32, n*n + 2n values)
                        pre  = sigmoid(a_pre * m_pre + b_pre)           (n,)
                        post = 2 * sigmoid(a_post * m_post + b_post)    (n,)
                        res  = Sinkhorn(a_res * m_res + b_res)          (n, n), doubly stochastic
  read:   u = sum_i pre_i x_i                       (the sublayer then applies its own RMSNorm)
  write:  x'_k = post_k * F(u) + sum_j res[j, k] x_j

Convention: `res[j, k]` is the weight from input stream j to output stream k, so the paper's
H_res (which multiplies the column of streams, x' = H_res x) is `res.T`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.nn.normalization import rms_norm
from engram_jax.nn.params import logical_param
from engram_jax.sharding.axes import HC_COEFFS, HC_FLAT, HC_STREAMS

COEFF_NORM_EPS = 1e-6
GATE_INIT = 0.01  # a_pre, a_post, a_res
RES_DIAG_INIT = 4.0  # b_res on the diagonal: Sinkhorn(b_res) starts near the identity


def expand_streams(x: jax.Array, n: int) -> jax.Array:
    """(B, L, C) -> (B, L, n, C): every stream starts as a copy."""
    return jnp.repeat(x[:, :, None, :], n, axis=2)


def sinkhorn(logits: jax.Array, iters: int) -> jax.Array:
    """Projects logits (..., n, n) onto doubly stochastic matrices, in float32 log space.

    exp(logits), then `iters` rounds of row normalisation followed by column normalisation; the
    columns sum to 1 exactly (up to rounding), the rows to within the Sinkhorn residual.
    """
    def normalise(_, log_p):
        log_p = log_p - jax.nn.logsumexp(log_p, axis=-1, keepdims=True)
        return log_p - jax.nn.logsumexp(log_p, axis=-2, keepdims=True)

    # A loop, not unrolled: the body compiles once whatever the number of iterations.
    return jnp.exp(jax.lax.fori_loop(0, iters, normalise, logits.astype(jnp.float32)))


def mhc_coefficients(x: jax.Array, phi: jax.Array, gates: jax.Array, bias_pre: jax.Array,
                     bias_post: jax.Array, bias_res: jax.Array, sinkhorn_iters: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token mixing coefficients, all float32.

    Args:
      x: (B, L, n, C) streams.
      phi: (n*C, n*n + 2n) projection; columns [pre (n), post (n), res (n*n, row-major j, k)].
      gates: (3,) scalars a_pre, a_post, a_res.
      bias_pre, bias_post: (n,); bias_res: (n, n).

    Returns:
      pre (B, L, n), post (B, L, n), res (B, L, n, n) with res[..., j, k] from stream j to k.
    """
    n = x.shape[2]
    flat = rms_norm(x.reshape(*x.shape[:2], -1), None, COEFF_NORM_EPS)
    mix = jnp.einsum("blf,fc->blc", flat, phi.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    a = gates.astype(jnp.float32)
    pre = jax.nn.sigmoid(a[0] * mix[..., :n] + bias_pre.astype(jnp.float32))
    post = 2.0 * jax.nn.sigmoid(a[1] * mix[..., n:2 * n] + bias_post.astype(jnp.float32))
    res_logits = a[2] * mix[..., 2 * n:].reshape(*mix.shape[:2], n, n) + bias_res.astype(
        jnp.float32)
    return pre, post, sinkhorn(res_logits, sinkhorn_iters)


def mhc_read(x: jax.Array, pre: jax.Array) -> jax.Array:
    """u = sum_i pre_i x_i: (B, L, n, C), (B, L, n) -> (B, L, C) in x's dtype."""
    return jnp.einsum("blnc,bln->blc", x, pre.astype(x.dtype))


def mhc_write(x: jax.Array, out: jax.Array, post: jax.Array, res: jax.Array) -> jax.Array:
    """x'_k = post_k * out + sum_j res[j, k] x_j: -> (B, L, n, C) in x's dtype."""
    mixed = jnp.einsum("bljk,bljc->blkc", res.astype(x.dtype), x)
    return mixed + post.astype(x.dtype)[..., None] * out[:, :, None, :].astype(x.dtype)


class MHC(nnx.Module):
    """mHC around one sublayer. With `n == 1` it is the plain residual x + F(x), exactly.

    Args:
      n: number of streams; width: C, each stream's width.
      sinkhorn_iters: Sinkhorn iterations for the residual matrix.

    Initialisation: a_* = 0.01; b_pre = logit(1/n), so u starts as the mean of the streams;
    b_post = 0, so every stream gets F(u); b_res = 4 on the diagonal, so res starts near the
    identity; phi ~ N(0, 1/(nC)), which makes the coefficients differ slightly between streams
    and between tokens (identical streams would otherwise stay identical forever).
    """

    def __init__(self, n: int, width: int, sinkhorn_iters: int = 20, *,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.n = n
        self.sinkhorn_iters = sinkhorn_iters
        if n == 1:
            return
        keys = rngs.params
        self.phi = logical_param(nnx.initializers.normal(1.0 / np.sqrt(n * width)), keys(),
                                 (n * width, n * n + 2 * n), param_dtype, (HC_FLAT, HC_COEFFS))
        self.gates = logical_param(nnx.initializers.constant(GATE_INIT), keys(), (3,),
                                   param_dtype, (None,))
        self.bias_pre = logical_param(nnx.initializers.constant(-np.log(n - 1.0)), keys(), (n,),
                                      param_dtype, (HC_STREAMS,))
        self.bias_post = logical_param(nnx.initializers.zeros, keys(), (n,), param_dtype,
                                       (HC_STREAMS,))
        self.bias_res = logical_param(
            lambda key, shape, dtype: RES_DIAG_INIT * jnp.eye(n, dtype=dtype), keys(), (n, n),
            param_dtype, (HC_STREAMS, None))

    def coefficients(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """pre, post, res of `x` (B, L, n, C); recomputed in the backward pass, not stored."""
        compute = jax.checkpoint(mhc_coefficients, static_argnums=(6,))
        return compute(x, self.phi[...], self.gates[...], self.bias_pre[...],
                       self.bias_post[...], self.bias_res[...], self.sinkhorn_iters)

    def read(self, x: jax.Array) -> jax.Array:
        """The sublayer's input u (B, L, C) from streams x (B, L, n, C): the pre-mapping."""
        if self.n == 1:
            return x[:, :, 0]
        return mhc_read(x, self.coefficients(x)[0])

    def __call__(self, x: jax.Array, sublayer: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """x (B, L, n, C) -> x' (B, L, n, C) around `sublayer`: (B, L, C) -> (B, L, C)."""
        if self.n == 1:
            return x + sublayer(x[:, :, 0])[:, :, None].astype(x.dtype)
        pre, post, res = self.coefficients(x)
        return mhc_write(x, sublayer(mhc_read(x, pre)), post, res)


class StreamMerge(nnx.Module):
    """Merges n streams into one before the final norm: "sum", or "learned" (a dynamic pre-style
    weighting sigmoid(a * x̂ phi + b), initialised to the mean)."""

    def __init__(self, n: int, width: int, mode: str, *, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if mode not in ("sum", "learned"):
            raise ValueError(f"stream merge {mode!r} is not 'sum' or 'learned'")
        self.mode = "sum" if n == 1 else mode
        if self.mode == "learned":
            keys = rngs.params
            self.phi = logical_param(nnx.initializers.normal(1.0 / np.sqrt(n * width)), keys(),
                                     (n * width, n), param_dtype, (HC_FLAT, HC_STREAMS))
            self.gate = logical_param(nnx.initializers.constant(GATE_INIT), keys(), (1,),
                                      param_dtype, (None,))
            self.bias = logical_param(nnx.initializers.constant(-np.log(n - 1.0)), keys(), (n,),
                                      param_dtype, (HC_STREAMS,))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, L, n, C) -> (B, L, C)."""
        if self.mode == "sum":
            return jnp.sum(x, axis=2)
        flat = rms_norm(x.reshape(*x.shape[:2], -1), None, COEFF_NORM_EPS)
        mix = flat @ self.phi[...].astype(jnp.float32)
        weights = jax.nn.sigmoid(self.gate[...].astype(jnp.float32) * mix + self.bias[...])
        return mhc_read(x, weights)
