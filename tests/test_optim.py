"""The optimiser: which transform each parameter gets, and the learning-rate schedules."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from engram_jax.train import optimizer as optim
from engram_jax.config import TrainConfig, load_model_config
from engram_jax.nn.model import Transformer

TINY = load_model_config(pathlib.Path(__file__).parent.parent / "configs" / "tiny.yaml")


def _labels(model):
    labels = optim.param_labels(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {"/".join(str(k.key) for k in path): label
            for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]}


def test_labels():
    labels = _labels(Transformer(TINY, rngs=nnx.Rngs(0)))
    assert labels["blocks/1/engram/table"] == optim.ENGRAM_TABLE
    assert [k for k, v in labels.items() if v == optim.ENGRAM_TABLE] == ["blocks/1/engram/table"]
    for name in ("blocks/0/attn/wq", "blocks/1/engram/key_kernel", "blocks/1/ffn/w_gate",
                 "blocks/1/attn_mhc/phi", "embed", "head", "blocks/1/ffn/router_kernel"):
        assert labels[name] == optim.BACKBONE, name
    for name in ("blocks/0/attn_norm/scale", "blocks/1/engram/key_bias", "blocks/1/engram/conv_norm",
                 "blocks/1/attn_mhc/bias_res", "blocks/1/attn_mhc/gates", "final_norm/scale"):
        assert labels[name] == optim.NO_DECAY, name


def test_tables_get_adam_at_five_times_the_rate_and_no_decay():
    """First Adam step moves each weight by lr * sign(grad); AdamW adds lr * wd * w."""
    config = TrainConfig(learning_rate=1e-3, warmup_steps=0, schedule="constant", clip_norm=0.0,
                         weight_decay=0.1, engram_lr_multiplier=5.0)
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, optim.make_optimizer(config), wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    delta = lambda *path: _get(before, path) - _get(after, path)
    np.testing.assert_allclose(delta("blocks", 1, "engram", "table"), 5e-3, rtol=1e-3)
    np.testing.assert_allclose(delta("final_norm", "scale"), 1e-3, rtol=1e-3)
    w = _get(before, ("blocks", 0, "attn", "wq"))
    np.testing.assert_allclose(delta("blocks", 0, "attn", "wq"), 1e-3 * (1 + 0.1 * w), rtol=1e-3,
                               atol=1e-7)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


def test_schedules():
    base = TrainConfig(steps=100, learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    cosine = optim.learning_rate_schedule(base)
    assert float(cosine(0)) == 0.0 and abs(float(cosine(10)) - 1.0) < 1e-6
    assert abs(float(cosine(100)) - 0.1) < 1e-6
    step = optim.learning_rate_schedule(dataclasses.replace(base, schedule="step"))
    assert [round(float(step(s)), 4) for s in (5, 50, 85, 95)] == [0.5, 1.0, 0.1, 0.01]
    constant = optim.learning_rate_schedule(dataclasses.replace(base, schedule="constant"))
    assert float(constant(99)) == 1.0


def test_clipping_is_applied_to_all_gradients():
    """Two steps with large gradients equal two steps of pre-clipped gradients unclipped."""
    base = TrainConfig(warmup_steps=0, schedule="constant", clip_norm=1.0)
    clipped, plain = optim.make_optimizer(base), optim.make_optimizer(
        dataclasses.replace(base, clip_norm=0.0))
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    grads = [{"a": jnp.full(3, 100.0), "b": jnp.full(2, -50.0)},
             {"a": jnp.full(3, 0.5), "b": jnp.full(2, 2.0)}]
    unit = [jax.tree.map(lambda g, n=optax.tree.norm(g): g / jnp.maximum(n, 1.0), g)
            for g in grads]
    outputs = []
    for tx, gs in ((clipped, grads), (plain, unit)):
        state, p = tx.init(params), params
        for g in gs:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        outputs.append(p)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), *outputs)


def test_gradient_accumulation_equals_one_big_batch_and_bf16_steps():
    from engram_jax.data.compression import CompressedTokenizer
    from engram_jax.data.hashing import NgramHasher
    from engram_jax.train.step import train_step

    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (8, 17)).astype(np.int32)
    hasher = NgramHasher(TINY.engram, CompressedTokenizer.identity(TINY.vocab_size))
    batch = {"tokens": jnp.asarray(tokens),
             "hash_ids": {k: jnp.asarray(v) for k, v in hasher(tokens[:, :-1]).items()}}
    config = TrainConfig(warmup_steps=0, schedule="constant", learning_rate=1e-2)
    step = nnx.jit(train_step, static_argnums=(3,))
    params = {}
    for accum in (1, 2):
        model = Transformer(TINY, rngs=nnx.Rngs(0))
        # SGD with rate 1: the parameter change is the gradient (Adam's first step would divide
        # by |g| and magnify rounding in near-zero gradients).
        optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
        metrics = step(model, optimizer, batch, accum)
        params[accum] = (nnx.to_pure_dict(nnx.state(model, nnx.Param)), float(metrics["loss"]),
                         np.asarray(model.blocks[1].ffn.router_bias[...]))
    np.testing.assert_allclose(params[1][1], params[2][1], rtol=1e-5)
    np.testing.assert_array_equal(params[1][2], params[2][2])  # same load over the whole batch
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
                 params[1][0], params[2][0])
    # Mixed precision: float32 parameters, bfloat16 compute.
    low = Transformer(dataclasses.replace(TINY, dtype="bfloat16"), rngs=nnx.Rngs(0))
    metrics = step(low, nnx.Optimizer(low, optim.make_optimizer(config), wrt=nnx.Param), batch, 1)
    assert np.isfinite(float(metrics["loss"]))
    assert low.blocks[0].attn.wq[...].dtype == jnp.float32
