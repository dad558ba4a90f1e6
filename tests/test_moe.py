"""DeepSeekMoE: routing, dropless and capacity dispatch against a per-token loop, balancing, and
the sharded dispatch (batch shards, expert-parallel all-to-all) against the same loop."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.config import MoEConfig, ShardingConfig
from engram_jax.nn import moe as moe_lib
from engram_jax.sharding import global_batch, make_mesh, use_mesh

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


@pytest.mark.parametrize("rows,num_experts,pattern", [
    (2, 12, "spread"), (40, 12, "spread"), (3000, 12, "spread"), (3000, 12, "one expert"),
    (3000, 5, "short"), (7, 16, "short")])
def test_tiled_grouped_matmul_equals_ragged_dot(rows, num_experts, pattern):
    """The CPU grouped matmul gives ragged_dot's rows and gradients, with empty experts, one
    expert holding every row, and rows past sum(sizes) (zeros)."""
    rng = np.random.default_rng(rows + num_experts)
    x = jnp.asarray(rng.normal(size=(rows, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(num_experts, 16, 8)), jnp.float32)
    used = rows - 3 if pattern == "short" else rows
    if pattern == "one expert":
        sizes = np.eye(num_experts, dtype=np.int32)[num_experts // 2] * used
    else:
        sizes = rng.multinomial(used, np.ones(num_experts) / num_experts)
    sizes = jnp.asarray(sizes, jnp.int32)
    # Tiles of one row (decode), of 16 (padding exercised) and at most 128.
    assert [moe_lib.grouped_tile_rows(r, 12) for r in (2, 3000, 10**6)] == [1, 16, 128]
    tiled = jax.jit(moe_lib.tiled_grouped_matmul)(x, w, sizes)
    np.testing.assert_allclose(tiled[:used], jax.lax.ragged_dot(x, w, sizes)[:used], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(tiled[used:], 0.0)

    def loss(fn, x, w):
        return jnp.sum(jnp.sin(fn(x, w, sizes)[:used]))

    tiled_grads = jax.grad(functools.partial(loss, moe_lib.tiled_grouped_matmul), (0, 1))(x, w)
    ragged_grads = jax.grad(functools.partial(loss, jax.lax.ragged_dot), (0, 1))(x, w)
    for got, want in zip(tiled_grads, ragged_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


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


# On a mesh each batch shard dispatches its own tokens; with experts split over `expert`, rows
# travel by all-to-all. Meshes over the 8 fake devices of the conftest.
SPLIT = MoEConfig(num_routed_experts=8, num_shared_experts=1, top_k=2, expert_hidden_size=8)
EXPERT_MESHES = {
    "data8": ShardingConfig(data=8),
    "fsdp2_tensor2_expert2": ShardingConfig(fsdp=2, tensor=2, expert=2),
    "data2_expert4": ShardingConfig(data=2, expert=4),
    "expert8": ShardingConfig(data=1, expert=8),
}


def _on_mesh(sharding, config, x, bias=None, with_weight_grads=False):
    """Output, input gradient and expert load of the layer on a mesh (same initial weights),
    and with `with_weight_grads` the parameters' gradients (a pure dict)."""
    mesh = make_mesh(sharding)
    with use_mesh(sharding, mesh):
        layer = _layer(config)
        if bias is not None:
            layer.router_bias[...] = bias

        out, dx, dw = _output_and_grads(layer, global_batch(np.asarray(x), mesh))
        result = np.asarray(out), np.asarray(dx), np.asarray(layer.expert_load[...])
        return result + (jax.device_get(nnx.to_pure_dict(dw)),) if with_weight_grads else result


@nnx.jit
def _output_and_grads(layer, x):
    """The layer's output and the gradients of sum(sin(output)) with respect to x and to the
    layer's parameters."""
    def loss(layer, x):
        out = layer(x)
        return jnp.sum(jnp.sin(out)), out

    (_, out), (dw, dx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
    return out, dx, dw


def _output_and_input_grad(layer, x):
    out, dx, _ = _output_and_grads(layer, x)
    return out, dx


@pytest.mark.parametrize("name", EXPERT_MESHES)
@pytest.mark.parametrize("skew", [False, True], ids=["spread", "all_on_one_shard"])
def test_sharded_dropless_equals_the_loop(name, skew):
    x = jax.random.normal(jax.random.key(6), (8, 6, D))
    # Skewed: every token picks experts 0 and 1, held by one shard; its buffers overflow and the
    # exchange takes more rounds (forward and backward).
    bias = jnp.zeros(8).at[:2].set(50.0) if skew else None
    out, dx, load, dw = _on_mesh(EXPERT_MESHES[name], SPLIT, x, bias, with_weight_grads=True)
    layer = _layer(SPLIT)
    if bias is not None:
        layer.router_bias[...] = bias
    np.testing.assert_allclose(out.reshape(-1, D), _naive(layer, x.reshape(-1, D)), rtol=2e-5,
                               atol=2e-5)
    _, ref_dx, ref_dw = _output_and_grads(layer, x)
    np.testing.assert_allclose(dx, ref_dx, rtol=2e-5, atol=2e-5)
    chex.assert_trees_all_close(dw, nnx.to_pure_dict(ref_dw), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(load, layer.expert_load[...])  # the global load
    if skew:
        assert load[:2].sum() == x.shape[0] * x.shape[1] * 2


@pytest.mark.parametrize("name", ["data8", "data2_expert4"])
def test_sharded_capacity_mode_keeps_per_shard_capacity(name):
    """Capacity applies to each batch shard's tokens: the loop run on each sequence alone (the
    meshes give each of the 8 shards one sequence)."""
    config = dataclasses.replace(SPLIT, capacity_factor=0.75)
    x = jax.random.normal(jax.random.key(7), (8, 6, D))
    out, _, _ = _on_mesh(EXPERT_MESHES[name], config, x)
    layer = _layer(config)
    capacity = moe_lib.expert_capacity(6, 2, 8, 0.75)
    for row in range(8):
        np.testing.assert_allclose(out[row], _naive(layer, x[row], capacity), rtol=2e-5,
                                   atol=2e-5, err_msg=f"sequence {row}")


def test_exchange_with_buffers_exactly_full_equals_local_dispatch():
    """Balanced assignments fill every per-destination buffer exactly (no fallback)."""
    shards, tokens, k, experts_total = 4, 8, 2, 8
    mesh = jax.make_mesh((shards,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:shards])
    layer = _layer(SPLIT)
    weights_ = [layer.w_gate[...], layer.w_up[...], layer.w_down[...]]
    x = jax.random.normal(jax.random.key(8), (shards * tokens, D))
    # Token t of each shard sends its j-th assignment to expert (2t + j) mod 8: each of the 8
    # experts gets 2 of a shard's 16 assignments, so each destination shard gets 4.
    local = (2 * jnp.arange(tokens)[:, None] + jnp.arange(k)[None]) % experts_total
    experts = jnp.tile(local, (shards, 1)).astype(jnp.int32)
    gate = jax.nn.softmax(jax.random.normal(jax.random.key(9), (shards * tokens, k)))
    spec = jax.sharding.PartitionSpec("expert")
    exchanged = jax.jit(jax.shard_map(
        lambda *a: moe_lib.exchange_dispatch(*a, axis_name="expert", num_shards=shards,
                                             capacity=tokens * k // shards),
        mesh=mesh, in_specs=(spec, spec, spec, spec, spec, spec), out_specs=spec,
        check_vma=False))(x, experts, gate, *weights_)
    expected = moe_lib.dispatch_dropless(x, experts, gate, *weights_)
    np.testing.assert_allclose(exchanged, expected, rtol=2e-5, atol=2e-6)
