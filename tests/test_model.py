"""The assembled decoder on the `tiny` preset: shapes, causality, init, dtypes, tracing, remat."""

import dataclasses
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.data.compression import CompressedTokenizer
from engram_jax.config import load_model_config
from engram_jax.data.hashing import NgramHasher
from engram_jax.nn.model import Transformer

TINY = load_model_config(pathlib.Path(__file__).parent.parent / "configs" / "tiny.yaml")
B, L = 2, 24


def _batch(config=TINY, seed=0):
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, size=(B, L))
    return tokens, _hash(config, tokens)


def _hash(config, tokens):
    if config.engram is None:
        return None
    hasher = NgramHasher(config.engram, CompressedTokenizer.identity(config.vocab_size))
    return {k: jnp.asarray(v) for k, v in hasher(tokens).items()}


@nnx.jit
def _forward(model, tokens, hash_ids):
    return model(tokens, hash_ids)


@nnx.jit
def _value_and_grad(model, tokens, hash_ids):
    return nnx.value_and_grad(_loss)(model, tokens, hash_ids)


def _loss(model, tokens, hash_ids):
    logits = model(jnp.asarray(tokens), hash_ids)
    targets = jnp.roll(jnp.asarray(tokens), -1, axis=1)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))


def test_shapes():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    tokens, hash_ids = _batch()
    logits = _forward(model, jnp.asarray(tokens), hash_ids)
    chex.assert_shape(logits, (B, L, TINY.vocab_size))
    chex.assert_type(logits, jnp.float32)
    states = nnx.jit(lambda m, t, h: m.hidden_states(t, h))(model, jnp.asarray(tokens), hash_ids)
    assert len(states) == TINY.num_layers + 1
    chex.assert_shape(states, [(B, L, TINY.hc_mult, TINY.hidden_size)] * len(states))
    assert [type(b.ffn).__name__ for b in model.blocks] == ["SwiGLU", "MoE"]
    assert [b.engram is not None for b in model.blocks] == [False, True]


def test_causal_with_engram():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    tokens, hash_ids = _batch()
    base = _forward(model, jnp.asarray(tokens), hash_ids)
    for t in (0, 7, L - 2):
        changed = tokens.copy()
        changed[:, t + 1] = (changed[:, t + 1] + 17) % TINY.vocab_size
        out = _forward(model, jnp.asarray(changed), _hash(TINY, changed))
        np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5, rtol=1e-5)
        assert not np.allclose(out[:, t + 1], base[:, t + 1])


def test_four_streams_start_close_to_a_plain_residual():
    config = dataclasses.replace(TINY, engram=None)
    plain = Transformer(dataclasses.replace(config, hc_mult=1), rngs=nnx.Rngs(0))
    streams = Transformer(config, rngs=nnx.Rngs(1))
    nnx.update(streams, nnx.state(plain, nnx.Param))  # same backbone weights in both
    tokens, _ = _batch(config)
    a, b = _forward(plain, jnp.asarray(tokens), None), _forward(streams, jnp.asarray(tokens), None)
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
    assert rel < 0.05, rel


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_and_gradient_finite(dtype):
    config = dataclasses.replace(TINY, dtype=dtype)
    model = Transformer(config, rngs=nnx.Rngs(0))
    tokens, hash_ids = _batch(config)
    loss, grads = _value_and_grad(model, jnp.asarray(tokens), hash_ids)
    chex.assert_tree_all_finite((loss, grads))
    assert 4.0 < float(loss) < 12.0  # near log(512) = 6.2 at init
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(grads)}
    for name in ("blocks/1/engram/table", "blocks/1/attn_mhc/phi", "blocks/1/ffn/w_gate"):
        assert float(jnp.abs(flat[name][...]).max()) > 0, name


def test_bf16_params_and_compute_close_to_fp32():
    tokens, hash_ids = _batch()
    ref = _forward(Transformer(TINY, rngs=nnx.Rngs(0)), jnp.asarray(tokens), hash_ids)
    low = _forward(Transformer(dataclasses.replace(TINY, dtype="bfloat16"), rngs=nnx.Rngs(0)),
                   jnp.asarray(tokens), hash_ids)
    rel = float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05, rel


def test_train_step_does_not_retrace():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grad_step(state, tokens, hash_ids):
        model = nnx.merge(graphdef, state)
        return nnx.value_and_grad(_loss)(model, tokens, hash_ids)[0]

    for seed in range(3):
        tokens, hash_ids = _batch(seed=seed)
        grad_step(state, jnp.asarray(tokens), hash_ids)


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_gives_the_same_loss_and_gradients(remat):
    tokens, hash_ids = _batch()
    tokens = jnp.asarray(tokens)
    ref_loss, ref_grads = _value_and_grad(Transformer(TINY, rngs=nnx.Rngs(0)), tokens, hash_ids)
    model = Transformer(dataclasses.replace(TINY, remat=remat), rngs=nnx.Rngs(0))
    loss, grads = _value_and_grad(model, tokens, hash_ids)
    chex.assert_trees_all_close((loss, nnx.state(grads)), (ref_loss, nnx.state(ref_grads)),
                                atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [8, 10])  # 10: the largest divisor of 24 below it, 8
def test_chunked_loss_equals_the_whole_sequence_loss(chunk):
    """`next_token_nll` with the logits built a chunk at a time (a rematerialised scan) gives
    the per-token losses and gradients of the whole-sequence head, untied and tied."""
    from engram_jax.nn.loss import chunk_size

    assert chunk_size(L, chunk) == 8 and chunk_size(L, 0) == L
    tokens = np.random.default_rng(1).integers(0, TINY.vocab_size, size=(B, L + 1))
    hash_ids = _hash(TINY, tokens[:, :-1])
    loss = nnx.jit(nnx.value_and_grad(
        lambda m: m.next_token_nll(jnp.asarray(tokens), hash_ids).mean()))
    for tie in (False, True):
        whole = Transformer(dataclasses.replace(TINY, logits_chunk=0, tie_embeddings=tie),
                            rngs=nnx.Rngs(0))
        chunked = Transformer(dataclasses.replace(TINY, logits_chunk=chunk, tie_embeddings=tie),
                              rngs=nnx.Rngs(0))
        per_token = chunked.next_token_nll(jnp.asarray(tokens), hash_ids)
        chex.assert_shape(per_token, (B, L))
        chex.assert_trees_all_close(per_token, whole.next_token_nll(jnp.asarray(tokens),
                                                                    hash_ids), atol=1e-5)
        (value, grads), (ref_value, ref_grads) = loss(chunked), loss(whole)
        chex.assert_trees_all_close((value, nnx.state(grads)), (ref_value, nnx.state(ref_grads)),
                                    atol=1e-5, rtol=1e-4)


def test_variants_tied_learned_merge_gqa_and_capacity():
    config = dataclasses.replace(TINY, tie_embeddings=True, stream_merge="learned",
                                 moe=dataclasses.replace(TINY.moe, capacity_factor=1.25))
    model = Transformer(config, rngs=nnx.Rngs(0))
    assert model.head is None
    tokens, hash_ids = _batch(config)
    loss, grads = _value_and_grad(model, jnp.asarray(tokens), hash_ids)
    chex.assert_tree_all_finite((loss, grads))


def test_router_bias_update_through_the_model():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    tokens, hash_ids = _batch()
    _forward(model, jnp.asarray(tokens), hash_ids)
    loads = {layer: np.asarray(load) for layer, load in model.expert_loads().items()}
    assert list(loads) == [1]
    assert all(load.sum() == B * L * TINY.moe.top_k for load in loads.values())
    model.update_router_biases()
    np.testing.assert_allclose(model.blocks[1].ffn.router_bias[...],
                               TINY.moe.bias_update_rate * np.sign(loads[1].mean() - loads[1]))


def test_missing_hash_ids_is_an_error():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    tokens, _ = _batch()
    with pytest.raises(ValueError, match="layer 1 has an Engram module but got no hash ids"):
        model(jnp.asarray(tokens))


def test_every_parameter_has_logical_axes():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    for path, spec in nnx.to_flat_state(specs):
        value = spec.get_value()
        assert value is not None and len(value) > 0, path


def test_single_fusion_reaches_the_streams_only_through_attention():
    single = dataclasses.replace(TINY, engram=dataclasses.replace(TINY.engram, fusion="single"))
    tokens, hash_ids = _batch(single)
    other_ids = _batch(single, seed=1)[1]
    for config, depends_without_attention in ((TINY, True), (single, False)):
        model = Transformer(config, rngs=nnx.Rngs(0))
        engram = model.blocks[1].engram
        chex.assert_shape(engram.key_kernel, (1 if config is single else TINY.hc_mult,
                                              TINY.engram.embed_dim, TINY.hidden_size))
        run = nnx.jit(lambda m, t, h: m.hidden_states(t, h)[2])
        before = run(model, jnp.asarray(tokens), hash_ids)
        assert not np.allclose(before, run(model, jnp.asarray(tokens), other_ids))
        model.blocks[1].attn.wo[...] = jnp.zeros_like(model.blocks[1].attn.wo[...])
        same = np.allclose(run(model, jnp.asarray(tokens), hash_ids),
                           run(model, jnp.asarray(tokens), other_ids), atol=1e-6)
        assert same != depends_without_attention
