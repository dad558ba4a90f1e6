"""Host hashing: bit-for-bit parity with the reference demo, document resets."""

import dataclasses

import numpy as np
import pytest

from engram_jax.data import hashing
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.config import EngramConfig
from engram_jax.data.tokenizer import load_tokenizer
from reference import HASH_CASES, TOKENIZER_DIR, engram_config, load_case


@pytest.fixture(scope="module")
def compressor():
    return CompressedTokenizer.from_tokenizer(load_tokenizer(TOKENIZER_DIR))


@pytest.mark.parametrize("case", HASH_CASES)
def test_hash_ids_equal_reference_demo(case, compressor):
    settings, ref = load_case("hash", case)
    config = engram_config(settings)
    hasher = hashing.NgramHasher(config, compressor)
    for layer_id in config.layer_ids:
        np.testing.assert_array_equal(hasher.multipliers[layer_id], ref[f"multipliers_{layer_id}"])
        np.testing.assert_array_equal(hasher.layout[layer_id].head_sizes, ref[f"sizes_{layer_id}"])
    for inputs in ("random", "text"):
        ids = hasher(ref[f"{inputs}_ids"])
        for layer_id in config.layer_ids:
            expected = ref[f"{inputs}_hash_{layer_id}"]
            assert ids[layer_id].dtype == np.int32
            assert ids[layer_id].shape == expected.shape == (
                *ref[f"{inputs}_ids"].shape, config.num_heads)
            np.testing.assert_array_equal(ids[layer_id], expected)


def test_multipliers_are_odd_and_seeded_per_layer():
    a = hashing.layer_multipliers(0, 1, 3, 1000)
    assert a.dtype == np.int64 and (a % 2 == 1).all()
    np.testing.assert_array_equal(a, hashing.layer_multipliers(0, 1, 3, 1000))
    assert not np.array_equal(a, hashing.layer_multipliers(0, 2, 3, 1000))
    assert not np.array_equal(a, hashing.layer_multipliers(1, 1, 3, 1000))


def _reset_config():
    return EngramConfig(vocab_size_per_ngram=(1009, 2003), n_embed_per_ngram=8, n_head_per_ngram=2,
                        layer_ids=(0,), pad_id=1, reset_at_document_boundary=True)


def test_document_boundary_reset(compressor):
    config = _reset_config()
    sep = 0
    doc_a = np.array([50, 60, 70, sep])
    doc_b = np.array([80, 90, 100, 110])
    packed = np.concatenate([doc_a, doc_b])[None]
    with_reset = hashing.NgramHasher(config, compressor, separator_id=sep)(packed)[0]
    alone = hashing.NgramHasher(config, compressor, separator_id=sep)(doc_b[None])[0]
    np.testing.assert_array_equal(with_reset[:, 4:], alone)
    np.testing.assert_array_equal(
        with_reset[:, :4], hashing.NgramHasher(config, compressor, sep)(doc_a[None])[0])
    # Off (the reference's behaviour), the second document's first n-grams read the first's tail.
    plain = dataclasses.replace(config, reset_at_document_boundary=False)
    without = hashing.NgramHasher(plain, compressor)(packed)[0]
    assert not np.array_equal(without[:, 4:6], alone[:, :2])
    np.testing.assert_array_equal(without[:, 6:], alone[:, 2:])  # past the 3-gram reach: same


def test_segment_ids_from_separator():
    ids = np.array([[5, 0, 6, 7, 0, 0, 8]])
    np.testing.assert_array_equal(hashing.segment_ids_from_separator(ids, 0),
                                  [[0, 0, 1, 1, 1, 2, 3]])


def test_hasher_errors(compressor):
    with pytest.raises(ValueError, match="needs the document separator"):
        hashing.NgramHasher(_reset_config(), compressor)
    bad_pad = EngramConfig(vocab_size_per_ngram=(1009, 2003), layer_ids=(0,), pad_id=9999)
    with pytest.raises(ValueError, match="engram.pad_id=9999"):
        hashing.NgramHasher(bad_pad, compressor)
    too_big = EngramConfig(vocab_size_per_ngram=(300_000_000, 300_000_000), layer_ids=(0,))
    with pytest.raises(ValueError, match="do not fit int32"):
        hashing.NgramHasher(too_big, CompressedTokenizer.identity(10))
    hasher = hashing.NgramHasher(EngramConfig(vocab_size_per_ngram=(1009, 2003), layer_ids=(0,)),
                                 compressor)
    with pytest.raises(ValueError, match="shape \\(batch, length\\)"):
        hasher(np.arange(5))


def test_sequences_shorter_than_the_ngram_order_read_padding():
    """A 4-gram layer over sequences of 1 and 2 tokens: every missing position reads the pad
    id, exactly as in a longer sequence's first positions."""
    config = EngramConfig(vocab_size_per_ngram=(1009, 2003, 3001), max_ngram_size=4,
                          layer_ids=(0,), pad_id=1)
    hasher = hashing.NgramHasher(config, CompressedTokenizer.identity(50))
    long = hasher(np.array([[7, 8, 9, 10, 11]]))[0]
    for length in (1, 2):
        np.testing.assert_array_equal(hasher(np.array([[7, 8, 9, 10, 11][:length]]))[0],
                                      long[:, :length])
    np.testing.assert_array_equal(hashing.shifted_tokens(np.array([[5, 6]]), 3, 0), [[0, 0]])
