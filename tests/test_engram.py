"""The Engram module: reference parity, shapes, tracing, causality, gates, dtypes, axes."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.nn import engram as engram_lib
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.config import EngramConfig
from engram_jax.data.hashing import NgramHasher
from engram_jax.nn.normalization import rms_norm
from engram_jax.interop import load_reference_state_dict
from engram_jax.data.tokenizer import load_tokenizer
from reference import MODULE_CASES, TOKENIZER_DIR, engram_config, load_case

B, L, G, D = 2, 16, 4, 32
CONFIG = EngramConfig(vocab_size_per_ngram=(211, 223), max_ngram_size=3, n_embed_per_ngram=16,
                      n_head_per_ngram=2, layer_ids=(0, 2), pad_id=1)


@pytest.fixture(scope="module")
def compressor():
    return CompressedTokenizer.from_tokenizer(load_tokenizer(TOKENIZER_DIR))


def _inputs(compressor, seed=0, config=CONFIG, layer_id=2):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, compressor.vocab_size, size=(B, L))
    hidden = rng.standard_normal((B, L, G, D)).astype(np.float32)
    ids = NgramHasher(config, compressor)(tokens)[layer_id]
    return tokens, jnp.asarray(hidden), jnp.asarray(ids)


def _module(layer_id=2, conv_zero_init=True, **kwargs):
    config = dataclasses.replace(CONFIG, conv_zero_init=conv_zero_init)
    return engram_lib.Engram(config, layer_id, D, G, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("case", MODULE_CASES)
def test_output_equals_reference_demo(case, compressor):
    settings, ref = load_case("module", case)
    config = engram_config(settings, conv_zero_init=False)
    module = engram_lib.Engram(config, settings["layer_id"], settings["hidden_size"],
                               settings["hc_mult"], rngs=nnx.Rngs(0))
    load_reference_state_dict(module, {k[len("state."):]: v for k, v in ref.items()
                                       if k.startswith("state.")})
    ids = NgramHasher(config, compressor)(ref["input_ids"])[settings["layer_id"]]
    np.testing.assert_array_equal(ids, ref["hash_ids"])
    out = module(jnp.asarray(ref["hidden_states"]), jnp.asarray(ids))
    chex.assert_trees_all_close(out, ref["output"], atol=2e-5, rtol=1e-5)


def test_shapes_and_dtypes(compressor):
    _, hidden, ids = _inputs(compressor)
    module = _module()
    chex.assert_shape(ids, (B, L, CONFIG.num_heads))
    chex.assert_type(ids, jnp.int32)
    assert module.layout.rows == sum(module.layout.head_sizes)
    chex.assert_shape(module.table, (-(-module.layout.rows // 256) * 256, CONFIG.head_dim))
    chex.assert_shape(module.key_kernel, (G, CONFIG.embed_dim, D))
    chex.assert_shape(module.conv_kernel, (CONFIG.kernel_size, G, D))
    memory = module.embed(ids)
    chex.assert_shape(memory, (B, L, CONFIG.embed_dim))
    chex.assert_shape(module.gates(hidden, memory), (B, L, G))
    out = module(hidden, ids)
    chex.assert_shape(out, (B, L, G, D))
    chex.assert_type(out, jnp.float32)
    chex.assert_tree_all_finite(out)


def test_layer_tables_are_offset_per_head():
    module = _module()
    sizes = np.asarray(module.layout.head_sizes)
    np.testing.assert_array_equal(module.layout.offsets,
                                  np.concatenate([[0], np.cumsum(sizes)[:-1]]))
    # Layer 2 comes after layer 0 in the prime walk, so its tables are a little larger.
    assert module.layout.rows > _module(layer_id=0).layout.rows


def test_lookup_reads_each_heads_own_rows():
    table = jnp.arange(10 * 3, dtype=jnp.float32).reshape(10, 3)
    offsets = jnp.array([0, 4], dtype=jnp.int32)
    ids = jnp.array([[[1, 2]]], dtype=jnp.int32)
    out = engram_lib.lookup_embeddings(table, offsets, ids)
    np.testing.assert_array_equal(out, [[np.concatenate([table[1], table[6]])]])


def test_jit_does_not_retrace(compressor):
    module = _module()
    graphdef, state = nnx.split(module)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(state, hidden, ids):
        return nnx.merge(graphdef, state)(hidden, ids)

    for seed in range(3):
        _, hidden, ids = _inputs(compressor, seed)
        forward(state, hidden, ids).block_until_ready()


def test_causal(compressor):
    """Changing token t+1 (and its hidden state) never changes outputs at positions <= t."""
    module = _module(conv_zero_init=False)  # a random conv, so the conv path is exercised
    tokens, hidden, _ = _inputs(compressor)
    hasher = NgramHasher(CONFIG, compressor)
    base = module(hidden, jnp.asarray(hasher(tokens)[2]))
    for t in (0, 5, L - 2):
        changed = tokens.copy()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % compressor.vocab_size
        hidden2 = hidden.at[:, t + 1].add(1.0)
        out = module(hidden2, jnp.asarray(hasher(changed)[2]))
        np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])
        assert not np.allclose(out[:, t + 1], base[:, t + 1])


def test_gates_equal_hand_computed_values():
    """Keys fixed at ones (zero kernel, bias 1), so RMSNorm(k) = gain; queries along or against
    ones. With D = 4: <1, 1> / sqrt(4) = 2, so g = sigmoid(sqrt(2)); a key gain of 2 doubles the
    score to 4, so g = sigmoid(2); orthogonal queries give s = 0 and g = 1/2 exactly."""
    width, streams = 4, 2
    module = engram_lib.Engram(CONFIG, 2, width, streams, rngs=nnx.Rngs(0))
    module.key_kernel[...] = jnp.zeros_like(module.key_kernel[...])
    module.key_bias[...] = jnp.ones((streams, width))
    module.key_norm[...] = jnp.array([[1.0] * width, [2.0] * width])
    queries = np.array([[3.0, 3.0, 3.0, 3.0], [1.0, -1.0, 1.0, -1.0], [-0.5] * 4], np.float32)
    hidden = jnp.asarray(np.repeat(queries[None, :, None, :], streams, axis=2))  # (1, 3, 2, 4)
    gates = module.gates(hidden, jnp.zeros((1, 3, CONFIG.embed_dim)))
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    expected = [[sigmoid(np.sqrt(2)), sigmoid(2.0)], [0.5, 0.5],
                [sigmoid(-np.sqrt(2)), sigmoid(-2.0)]]
    np.testing.assert_allclose(gates[0], expected, rtol=1e-6)
    np.testing.assert_allclose(expected[0], [0.8044296, 0.8807971], rtol=1e-6)


def test_zero_conv_output_is_the_gated_value_exactly(compressor):
    module = _module()
    assert not np.any(module.conv_kernel[...])
    _, hidden, ids = _inputs(compressor)
    memory = module.embed(ids)
    gates = module.gates(hidden, memory)
    value = memory @ module.value_kernel[...] + module.value_bias[...]
    np.testing.assert_array_equal(module(hidden, ids), gates[..., None] * value[:, :, None, :])


def test_random_conv_init_when_asked():
    module = _module(conv_zero_init=False)
    kernel = np.asarray(module.conv_kernel[...])
    assert np.any(kernel) and np.abs(kernel).max() <= 0.5  # PyTorch's bound 1/sqrt(taps)


def test_bf16_compute_close_to_fp32(compressor):
    _, hidden, ids = _inputs(compressor)
    out32 = _module(conv_zero_init=False)(hidden, ids)
    module16 = _module(conv_zero_init=False, dtype=jnp.bfloat16)
    out16 = module16(hidden.astype(jnp.bfloat16), ids)
    chex.assert_type(out16, jnp.bfloat16)
    err = np.abs(np.asarray(out16, np.float32) - np.asarray(out32))
    assert err.max() < 0.05 * np.abs(np.asarray(out32)).max()
    gates16 = module16.gates(hidden.astype(jnp.bfloat16), module16.embed(ids))
    chex.assert_type(gates16, jnp.float32)  # the gate stays in float32 under bf16 compute


def test_bf16_parameters():
    module = _module(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    for _, leaf in nnx.iter_graph(nnx.state(module, nnx.Param)):
        if isinstance(leaf, jax.Array):
            assert leaf.dtype == jnp.bfloat16


def test_every_parameter_has_logical_axes():
    specs = nnx.get_partition_spec(nnx.state(_module(), nnx.Param))
    flat = {"/".join(map(str, path)): spec for path, spec in nnx.to_flat_state(specs)}
    expected = {
        "table": ("engram_rows", "engram_cols"),
        "key_kernel": ("hc_streams", "engram_embed", "embed"),
        "key_bias": ("hc_streams", "embed"),
        "key_norm": ("hc_streams", "embed"),
        "query_norm": ("hc_streams", "embed"),
        "value_kernel": ("engram_embed", "embed"),
        "value_bias": ("embed",),
        "conv_norm": ("hc_streams", "embed"),
        "conv_kernel": ("conv_taps", "hc_streams", "embed"),
    }
    assert {k: tuple(v.get_value()) for k, v in flat.items()} == expected


def test_shape_errors(compressor):
    module = _module()
    _, hidden, ids = _inputs(compressor)
    with pytest.raises(ValueError, match="hidden states must be"):
        module(hidden[:, :, :2], ids)
    with pytest.raises(ValueError, match="heads"):
        module(hidden, ids[..., :3])
    with pytest.raises(ValueError, match="layer_id=5 is not in engram.layer_ids"):
        _module(layer_id=5)


class PureFunctionsTest(chex.TestCase):
    """The pure math, with and without jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_conv_taps_read_t_minus_9_6_3_0(self):
        length, dilation = 12, 3
        x = jnp.zeros((1, length, 1)).at[0, 0, 0].set(1.0)  # an impulse at t = 0
        kernel = jnp.array([1.0, 10.0, 100.0, 1000.0])[:, None]
        y = self.variant(engram_lib.causal_depthwise_conv, static_argnums=2)(x, kernel, dilation)
        expected = np.zeros(length)
        expected[[0, 3, 6, 9]] = [1000.0, 100.0, 10.0, 1.0]  # y[t] = w[3]x[t] + ... + w[0]x[t-9]
        np.testing.assert_array_equal(y[0, :, 0], expected)

    @chex.variants(with_jit=True, without_jit=True)
    def test_signed_sqrt(self):
        s = jnp.array([-4.0, -1e-9, 0.0, 1e-9, 9.0])
        np.testing.assert_allclose(self.variant(engram_lib.signed_sqrt)(s),
                                   [-2.0, -1e-3, 0.0, 1e-3, 3.0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_rms_norm(self):
        x = jnp.array([[3.0, 4.0]])
        out = self.variant(rms_norm, static_argnums=2)(x, jnp.array([1.0, 2.0]), 0.0)
        rms = np.sqrt((9 + 16) / 2)
        np.testing.assert_allclose(out, [[3 / rms, 8 / rms]], rtol=1e-6)


def test_ungated_module_adds_the_value_on_every_stream(compressor):
    _, hidden, ids = _inputs(compressor)
    config = dataclasses.replace(CONFIG, gated=False, short_conv=False)
    module = engram_lib.Engram(config, 2, D, G, rngs=nnx.Rngs(0))
    assert not hasattr(module, "key_kernel") and not hasattr(module, "conv_kernel")
    memory = module.embed(ids)
    chex.assert_trees_all_equal(module.gates(hidden, memory), jnp.ones((B, L, G)))
    value = memory @ module.value_kernel[...] + module.value_bias[...]
    chex.assert_trees_all_close(module(hidden, ids),
                                jnp.broadcast_to(value[:, :, None], (B, L, G, D)), atol=1e-6)


def test_without_short_conv_the_output_is_the_gated_value(compressor):
    _, hidden, ids = _inputs(compressor)
    with_conv = _module(conv_zero_init=False)
    without = engram_lib.Engram(dataclasses.replace(CONFIG, conv_zero_init=False, short_conv=False),
                                2, D, G, rngs=nnx.Rngs(0))
    memory = without.embed(ids)
    gate = without.gates(hidden, memory)
    value = memory @ without.value_kernel[...] + without.value_bias[...]
    chex.assert_trees_all_close(without(hidden, ids), gate[..., None] * value[:, :, None],
                                atol=1e-6)
    assert not np.allclose(with_conv(hidden, ids), without(hidden, ids), atol=1e-3)
