"""Tokenizer compression against the reference demo and hand-made cases."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from engram_jax.data.compression import CompressedTokenizer, build_compression_lookup
from engram_jax.data.tokenizer import TextTokenizer, load_tokenizer
from reference import TOKENIZER_DIR, load_case


@pytest.fixture(scope="module")
def compressor():
    return CompressedTokenizer.from_tokenizer(load_tokenizer(TOKENIZER_DIR))


def test_lookup_equals_reference_demo(compressor):
    _, ref = load_case("hash", "demo")
    np.testing.assert_array_equal(compressor.lookup, ref["lookup"])
    assert compressor.compressed_vocab_size == int(ref["compressed_vocab_size"])
    assert compressor.vocab_size == int(ref["vocab_size"])


def test_partial_utf8_tokens_keep_their_raw_key(compressor):
    tok = load_tokenizer(TOKENIZER_DIR)
    partial = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]
    assert len(partial) >= 64  # the lone bytes 0x80-0xFF of a byte-level BPE at least
    raw = [tok.id_to_token(i) for i in partial]
    assert len(set(raw)) == len(raw)
    assert len(set(compressor.lookup[partial].tolist())) == len(partial)


def _word_level(words):
    vocab = {w: i for i, w in enumerate(words)}
    return TextTokenizer(Tokenizer(models.WordLevel(vocab, unk_token=words[0])))


def test_normalisation_rules():
    words = ["<unk>", "Hello", "hello", "HELLO", " hello", "Café", "cafe", "ﬁ", "fi", " ", "  ",
             "\t", "\n\n", "a  b", "a b", "Ⅻ", "xii", "x"]
    lookup, size = build_compression_lookup(_word_level(words))
    c = dict(zip(words, lookup.tolist()))
    # Case, accents, compatibility forms, and surrounding whitespace are folded away.
    assert c["Hello"] == c["hello"] == c["HELLO"] == c[" hello"]
    assert c["Café"] == c["cafe"]
    assert c["ﬁ"] == c["fi"]
    assert c["Ⅻ"] == c["xii"]
    # Whitespace runs collapse to one space, and a token of whitespace alone stays a space.
    assert c[" "] == c["  "] == c["\t"] == c["\n\n"]
    assert c["a  b"] == c["a b"]
    # Ids are numbered in order of first appearance.
    assert lookup[0] == 0 and lookup[1] == 1 and c["Café"] == 2
    assert size == len(set(lookup.tolist()))


def test_out_of_vocabulary_ids_raise(compressor):
    with pytest.raises(ValueError, match="token id 603 .* vocabulary of size 603"):
        compressor(np.array([[1, 2, 603]]))
    with pytest.raises(ValueError, match="token id -1"):
        compressor(np.array([-1]))
    with pytest.raises(TypeError, match="integers"):
        compressor(np.array([1.0]))


def test_identity_compressor():
    ident = CompressedTokenizer.identity(10)
    assert len(ident) == 10
    np.testing.assert_array_equal(ident(np.arange(10)), np.arange(10))
