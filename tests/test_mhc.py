"""mHC: Sinkhorn, the stream read/write convention, the n = 1 reduction, initialisation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.nn import mhc


@pytest.mark.parametrize("offset", [0.0, 1e4, -1e4])
def test_sinkhorn_is_doubly_stochastic_even_for_large_logits(offset):
    """Log space: logits of any magnitude (exp would overflow at 1e4) give the same matrix."""
    logits = jax.random.normal(jax.random.key(0), (256, 4, 4)) + offset
    p = mhc.sinkhorn(logits, 20)
    chex.assert_tree_all_finite(p)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-3)
    np.testing.assert_allclose(p.sum(-2), 1.0, atol=1e-3)
    np.testing.assert_allclose(p, mhc.sinkhorn(logits - offset, 20), atol=1e-5)
    weights = jax.random.normal(jax.random.key(1), (256, 4, 4))
    grad = jax.grad(lambda l: jnp.sum(mhc.sinkhorn(l, 20) * weights))(logits)
    chex.assert_tree_all_finite(grad)


def test_sinkhorn_with_widely_spread_logits_stays_finite():
    """Spread logits (std 1e4) converge slowly (rows are not yet normalised after 20 rounds),
    but nothing overflows: the matrix and its gradient are finite and columns sum to 1."""
    logits = 1e4 * jax.random.normal(jax.random.key(0), (64, 4, 4))
    p = mhc.sinkhorn(logits, 20)
    chex.assert_tree_all_finite(p)
    np.testing.assert_allclose(p.sum(-2), 1.0, atol=1e-3)
    assert float(p.min()) >= 0.0
    chex.assert_tree_all_finite(jax.grad(lambda l: jnp.sum(mhc.sinkhorn(l, 20) ** 2))(logits))


def test_sinkhorn_of_one_stream_is_one():
    np.testing.assert_array_equal(mhc.sinkhorn(jnp.array([[[7.0]], [[-3.0]]]), 20),
                                  [[[1.0]], [[1.0]]])


def test_write_convention_by_hand_2x2():
    """res[j, k] is the weight from input stream j to output stream k: paper H_res = res.T."""
    x = jnp.array([[[[1.0, 0.0], [0.0, 1.0]]]])  # (B=1, L=1, n=2, C=2): x_0 = e0, x_1 = e1
    res = jnp.array([[[[0.7, 0.3], [0.2, 0.8]]]])
    post = jnp.array([[[1.0, 2.0]]])
    out = jnp.array([[[10.0, 20.0]]])
    # x'_0 = 1*out + 0.7 x_0 + 0.2 x_1 ; x'_1 = 2*out + 0.3 x_0 + 0.8 x_1
    expected = [[[[10.7, 20.2], [20.3, 40.8]]]]
    np.testing.assert_allclose(mhc.mhc_write(x, out, post, res), expected, rtol=1e-6)
    pre = jnp.array([[[0.25, 0.5]]])
    np.testing.assert_allclose(mhc.mhc_read(x, pre), [[[0.25, 0.5]]])


def test_one_stream_is_the_plain_residual_exactly():
    x = jax.random.normal(jax.random.key(0), (2, 5, 1, 8))
    sublayer = lambda u: jnp.tanh(u) * 3.0
    layer = mhc.MHC(1, 8, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(layer(x, sublayer), x + sublayer(x[:, :, 0])[:, :, None])
    assert not nnx.state(layer, nnx.Param)  # no parameters at all
    # The general read/write with pre = post = res = 1 is the same thing.
    ones = jnp.ones((2, 5, 1))
    u = mhc.mhc_read(x, ones)
    np.testing.assert_array_equal(u, x[:, :, 0])
    np.testing.assert_array_equal(mhc.mhc_write(x, sublayer(u), ones, ones[..., None]),
                                  x + sublayer(x[:, :, 0])[:, :, None])


def test_initial_coefficients():
    n, width = 4, 16
    layer = mhc.MHC(n, width, rngs=nnx.Rngs(0))
    x = mhc.expand_streams(jax.random.normal(jax.random.key(1), (2, 6, width)), n)
    pre, post, res = layer.coefficients(x)
    chex.assert_shape((pre, post, res), ((2, 6, n), (2, 6, n), (2, 6, n, n)))
    np.testing.assert_allclose(pre, 1.0 / n, atol=0.01)
    np.testing.assert_allclose(post, 1.0, atol=0.02)
    diag = np.exp(mhc.RES_DIAG_INIT) / (np.exp(mhc.RES_DIAG_INIT) + n - 1)
    np.testing.assert_allclose(np.diagonal(res, axis1=-2, axis2=-1), diag, atol=0.01)
    # Symmetry is broken: the streams' coefficients differ, if only a little.
    assert float(jnp.std(pre, axis=-1).min()) > 0.0


def test_coefficients_are_recomputed_not_stored():
    layer = mhc.MHC(4, 8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 3, 4, 8))
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x, jnp.sin))

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, x))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_stream_merge():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 8))
    np.testing.assert_allclose(mhc.StreamMerge(4, 8, "sum", rngs=nnx.Rngs(0))(x), x.sum(2),
                               rtol=1e-6)
    learned = mhc.StreamMerge(4, 8, "learned", rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(learned, x.mean(2), atol=0.05)  # starts near the mean
    with pytest.raises(ValueError, match="stream merge 'max'"):
        mhc.StreamMerge(4, 8, "max", rngs=nnx.Rngs(0))
