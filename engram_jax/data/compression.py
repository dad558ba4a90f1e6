"""Tokenizer compression: token ids that differ only in surface form map to one id (paper §2.2;
docs/ARCHITECTURE.md, "Compression").

Every id of the tokenizer (added tokens included) is decoded on its own, special tokens kept. A
decoded text holding U+FFFD (a partial UTF-8 byte sequence) is keyed by its raw vocabulary string;
any other text is normalised (NFKC, NFD, strip accents, lowercase, collapse whitespace runs to one
space, keep a lone space, strip) and keyed by the result, or by the raw decoded text if that is
empty. Keys get compact ids in order of first appearance. This reproduces the reference demo's
`CompressedTokenizer` exactly; it uses the same `tokenizers` normalisers.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Regex, normalizers

from engram_jax.data.tokenizer import TextTokenizer

_SENTINEL = "\ue000"  # private-use character standing in for a lone space through `Strip`
REPLACEMENT_CHARACTER = "\ufffd"


def compression_normalizer() -> normalizers.Normalizer:
    """The normaliser the reference applies to each decoded token."""
    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _SENTINEL),
        normalizers.Strip(),
        normalizers.Replace(_SENTINEL, " "),
    ])


def build_compression_lookup(tokenizer: TextTokenizer) -> tuple[np.ndarray, int]:
    """Builds the compression table of a tokenizer.

    Returns:
      lookup: int64 array of shape (len(tokenizer),), token id -> compressed id.
      compressed_vocab_size: the number of distinct compressed ids, V'.
    """
    normalizer = compression_normalizer()
    vocab_size = len(tokenizer)
    texts = tokenizer.decode_each(range(vocab_size))
    key_to_new: dict[str, int] = {}
    lookup = np.empty(vocab_size, dtype=np.int64)
    for token_id, text in enumerate(texts):
        if REPLACEMENT_CHARACTER in text:
            key = tokenizer.id_to_token(token_id)
        else:
            key = normalizer.normalize_str(text) or text
        lookup[token_id] = key_to_new.setdefault(key, len(key_to_new))
    return lookup, len(key_to_new)


class CompressedTokenizer:
    """Maps token ids to compressed ids.

    Args:
      lookup: int array (vocab,), token id -> compressed id (from `build_compression_lookup`).
      compressed_vocab_size: V'; defaults to `lookup.max() + 1`.
    """

    def __init__(self, lookup: np.ndarray, compressed_vocab_size: int | None = None):
        self.lookup = np.asarray(lookup, dtype=np.int64)
        if self.lookup.ndim != 1 or self.lookup.size == 0:
            raise ValueError(f"lookup must be a non-empty 1-D array, got shape {self.lookup.shape}")
        self.compressed_vocab_size = int(
            compressed_vocab_size if compressed_vocab_size is not None else self.lookup.max() + 1)

    @classmethod
    def from_tokenizer(cls, tokenizer: TextTokenizer) -> CompressedTokenizer:
        return cls(*build_compression_lookup(tokenizer))

    @classmethod
    def identity(cls, vocab_size: int) -> CompressedTokenizer:
        """No compression: every id maps to itself (the paper's "compression off" ablation)."""
        return cls(np.arange(vocab_size, dtype=np.int64), vocab_size)

    @property
    def vocab_size(self) -> int:
        """Size of the uncompressed vocabulary."""
        return self.lookup.shape[0]

    def __len__(self) -> int:
        return self.compressed_vocab_size

    def __call__(self, token_ids: np.ndarray) -> np.ndarray:
        """Compresses an int array of token ids of any shape; returns int64 of the same shape.

        Raises:
          ValueError: naming the first id outside [0, vocab size). (The reference passes negative
            ids through and fails or clips on too-large ones; here both are errors.)
        """
        ids = np.asarray(token_ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            first = ids[bad].flat[0]
            position = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"token id {first} at position {position} is outside the tokenizer "
                             f"vocabulary of size {self.vocab_size}")
        return self.lookup[ids]
