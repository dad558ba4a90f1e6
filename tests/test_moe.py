"""DeepSeekMoE: routing, dropless and capacity dispatch against a per-token loop, balancing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.nn import moe as moe_lib
from engram_jax.config import MoEConfig

D = 16
CONFIG = MoEConfig(num_routed_experts=6, num_shared_experts=1, top_k=2, expert_hidden_size=8,
                   routed_scale=1.5)


def _layer(config=CONFIG):
    return moe_lib.MoE(D, config, rngs=nnx.Rngs(0))


def _naive(layer, x, capacity=None):
    """Per-token loop in numpy: shared expert + weighted chosen experts (first come, first kept)."""
    p = {k: np.asarray(getattr(layer, k)[...], np.float64)
         for k in ("router_kernel", "w_gate", "w_up", "w_down")}
    bias = np.asarray(layer.router_bias[...], np.float64)
    silu = lambda v: v / (1 + np.exp(-v))
    x = np.asarray(x, np.float64)
    used = np.zeros(p["w_gate"].shape[0], int)
    out = np.zeros_like(x)
    for t, token in enumerate(x):
        affinity = 1 / (1 + np.exp(-(token @ p["router_kernel"])))
        chosen = np.argsort(-(affinity + bias), kind="stable")[:layer.config.top_k]
        weights = layer.config.routed_scale * affinity[chosen] / affinity[chosen].sum()
        for e, w in zip(chosen, weights):
            used[e] += 1
            if capacity is not None and used[e] > capacity:
                continue
            hidden = silu(token @ p["w_gate"][e]) * (token @ p["w_up"][e])
            out[t] += w * (hidden @ p["w_down"][e])
        s = {k: np.asarray(getattr(layer.shared, k)[...], np.float64)
             for k in ("w_gate", "w_up", "w_down")}
        out[t] += (silu(token @ s["w_gate"]) * (token @ s["w_up"])) @ s["w_down"]
    return out


def test_route_weights_and_selection_bias():
    x = jax.random.normal(jax.random.key(0), (10, D))
    kernel = jax.random.normal(jax.random.key(1), (D, 6))
    weights, experts = moe_lib.route(x, kernel, jnp.zeros(6), 2, routed_scale=1.5)
    np.testing.assert_allclose(weights.sum(-1), 1.5, rtol=1e-6)
    assert experts.dtype == jnp.int32 and experts.shape == (10, 2)
    # A large selection bias forces expert 3 in, but its weight still comes from its affinity.
    biased_w, biased_e = moe_lib.route(x, kernel, jnp.zeros(6).at[3].set(10.0), 2)
    assert (biased_e == 3).any(axis=-1).all()
    affinity = jax.nn.sigmoid(x @ kernel)
    chosen = jnp.take_along_axis(affinity, biased_e, axis=-1)
    np.testing.assert_allclose(biased_w, chosen / chosen.sum(-1, keepdims=True), rtol=1e-6)


def test_dropless_equals_per_token_loop():
    layer = _layer()
    layer.router_bias[...] = jnp.array([0.0, 0.3, -0.2, 0.0, 0.1, 0.0])
    x = jax.random.normal(jax.random.key(2), (3, 7, D))
    out = layer(x)
    np.testing.assert_allclose(out.reshape(-1, D), _naive(layer, x.reshape(-1, D)), rtol=2e-5,
                               atol=2e-5)


def test_capacity_mode_drops_overflow_like_the_loop():
    x = jax.random.normal(jax.random.key(3), (2, 9, D))
    tokens = 18
    for factor in (0.5, 1.0, 100.0):
        layer = _layer(dataclasses.replace(CONFIG, capacity_factor=factor))
        capacity = moe_lib.expert_capacity(tokens, 2, 6, factor)
        np.testing.assert_allclose(layer(x).reshape(-1, D),
                                   _naive(layer, x.reshape(-1, D), capacity), rtol=2e-5, atol=2e-5)
    # With room for everything, capacity mode is the dropless result.
    roomy = _layer(dataclasses.replace(CONFIG, capacity_factor=100.0))
    np.testing.assert_allclose(roomy(x), _layer()(x), rtol=1e-5, atol=1e-6)


def test_load_is_counted_and_reset():
    layer = _layer()
    x = jax.random.normal(jax.random.key(4), (2, 5, D))
    layer(x)
    layer(x)
    load = np.asarray(layer.expert_load[...])
    assert load.sum() == 2 * 10 * CONFIG.top_k
    layer.update_bias()
    assert not np.any(layer.expert_load[...])
    expected = CONFIG.bias_update_rate * np.sign(load.mean() - load)
    np.testing.assert_allclose(layer.router_bias[...], expected, rtol=1e-6)


def test_balancing_bias_moves_load_toward_uniform():
    config = dataclasses.replace(CONFIG, bias_update_rate=0.02)
    layer = _layer(config)
    # Skew the router: tokens with a positive mean strongly prefer experts 0 and 1.
    layer.router_kernel[...] = layer.router_kernel[...].at[:, :2].add(0.3)
    x = jax.random.normal(jax.random.key(5), (4, 32, D)) + 1.0

    @nnx.jit
    def step(layer, x):
        layer(x)
        load = layer.expert_load[...]
        layer.update_bias()
        return load

    imbalance = []
    for _ in range(150):
        load = np.asarray(step(layer, x))
        imbalance.append(load.max() / load.mean())
    assert imbalance[0] > 2.0
    assert np.mean(imbalance[-10:]) < 0.6 * imbalance[0]
    assert np.asarray(layer.router_bias[...])[:2].max() < 0  # the favoured experts were pushed down


def test_router_bias_is_not_a_parameter():
    layer = _layer()
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 3, D)))))(layer)
    names = {path[-1] for path, _ in nnx.to_flat_state(grads)}
    assert "router_kernel" in names and "router_bias" not in names and "expert_load" not in names
