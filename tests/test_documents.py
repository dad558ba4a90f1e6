"""Packed documents kept apart (`data.document_mask`): every part of the model computes each
document as if it were alone: attention (XLA and the splash kernel), positions, hash ids and the
short convolution."""

import dataclasses
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.config import load_model_config
from engram_jax.data import pipeline, prepare
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.data.hashing import NgramHasher, segment_ids_from_separator
from engram_jax.nn.attention import causal_attention, splash_attention
from engram_jax.nn.engram import causal_depthwise_conv
from engram_jax.nn.model import Transformer, document_positions

TINY = load_model_config(pathlib.Path(__file__).parent.parent / "configs" / "tiny.yaml")
# A random (not zero) convolution, so that reading across a boundary would show; dropless MoE.
CONFIG = dataclasses.replace(TINY, engram=dataclasses.replace(
    TINY.engram, conv_zero_init=False, reset_at_document_boundary=True))
EOD = 0
LENGTHS = (9, 5, 18)  # documents of one packed row, each ending in EOD


def _documents(seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, TINY.vocab_size, size=n) for n in LENGTHS]
    for doc in docs:
        doc[-1] = EOD
    return docs


def _hasher():
    return NgramHasher(CONFIG.engram, CompressedTokenizer.identity(CONFIG.vocab_size),
                       separator_id=EOD)


def test_segment_ids_and_positions():
    row = np.concatenate(_documents())[None]
    segments = segment_ids_from_separator(row, EOD)
    np.testing.assert_array_equal(segments[0], np.repeat([0, 1, 2], LENGTHS))
    np.testing.assert_array_equal(document_positions(jnp.asarray(segments))[0],
                                  np.concatenate([np.arange(n) for n in LENGTHS]))


def test_the_pipeline_gives_segment_ids_from_its_packing():
    stream = np.concatenate(_documents() * 4).astype(np.int32)
    batch = next(iter(pipeline.batches(prepare.Windows(stream, 16), 2, None, seed=0, num_threads=0,
                                       separator_id=EOD)))
    chex.assert_shape(batch["segment_ids"], (2, 16))
    np.testing.assert_array_equal(batch["segment_ids"],
                                  segment_ids_from_separator(batch["tokens"][:, :-1], EOD))
    plain = next(iter(pipeline.batches(prepare.Windows(stream, 16), 2, None, seed=0, num_threads=0)))
    assert "segment_ids" not in plain


def test_the_model_computes_each_document_alone():
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    docs = _documents()
    row = np.concatenate(docs)[None]
    segments = jnp.asarray(segment_ids_from_separator(row, EOD))
    run = nnx.jit(lambda m, t, h, s: m(t, h, segment_ids=s))
    ids = lambda tokens: {k: jnp.asarray(v) for k, v in _hasher()(tokens).items()}
    packed = run(model, jnp.asarray(row), ids(row), segments)
    leaky = run(model, jnp.asarray(row), ids(row), None)
    start = 0
    for doc in docs:
        alone = run(model, jnp.asarray(doc[None]), ids(doc[None]), None)
        np.testing.assert_allclose(packed[:, start:start + len(doc)], alone, rtol=2e-5,
                                   atol=2e-5)
        if start:  # without the mask a later document reads the earlier ones
            assert not np.allclose(leaky[:, start:start + len(doc)], alone, atol=1e-3)
        start += len(doc)


def test_hash_ids_reset_at_each_document():
    docs = _documents()
    packed = _hasher()(np.concatenate(docs)[None])
    start = 0
    for doc in docs:
        alone = _hasher()(doc[None])
        for layer, ids in alone.items():
            np.testing.assert_array_equal(packed[layer][:, start:start + len(doc)], ids)
        start += len(doc)


def test_the_convolution_stays_within_each_document():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, sum(LENGTHS), 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    segments = jnp.asarray(np.repeat([0, 1, 2], LENGTHS)[None])
    packed = causal_depthwise_conv(x, kernel, 3, segments)
    start = 0
    for n in LENGTHS:
        alone = causal_depthwise_conv(x[:, start:start + n], kernel, 3)
        np.testing.assert_allclose(packed[:, start:start + n], alone, rtol=1e-6, atol=1e-6)
        start += n
    later = slice(LENGTHS[0], None)
    assert not np.allclose(causal_depthwise_conv(x, kernel, 3)[:, later], packed[:, later])


def test_splash_kernel_equals_xla_attention_with_documents():
    """The TPU kernel run by Pallas's interpreter on CPU: GQA, causal, three documents."""
    rng = np.random.default_rng(2)
    b, length, heads, kv_heads, width = 2, 256, 4, 2, 32
    normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    q, k, v = normal(b, length, heads, width), normal(b, length, kv_heads, width), normal(
        b, length, kv_heads, width)
    segments = jnp.asarray(np.repeat([[0] * 100 + [1] * 100 + [2] * 56], b, axis=0))
    for seg in (segments, None):
        xla = lambda q: causal_attention(q, k, v, seg, "xla")
        splash = lambda q: splash_attention(q, k, v, seg, interpret=True)
        np.testing.assert_allclose(splash(q), xla(q), atol=1e-5)
        grad = lambda f: jax.grad(lambda q: jnp.sum(f(q) ** 2))(q)
        np.testing.assert_allclose(grad(splash), grad(xla), atol=5e-5)
