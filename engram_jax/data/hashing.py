"""N-gram hashing on the host, identical to the reference demo (docs/ARCHITECTURE.md, "Hashing").

Token ids are compressed, then for every Engram layer and order n = 2..N the last n compressed
ids are mixed with odd per-layer multipliers (multiply and XOR in int64; the multipliers are
small enough that no product overflows) and reduced modulo one distinct prime per head
(`engram_jax.table_layout`). All int64 work happens here in numpy; the model receives int32 row
ids and never needs `jax_enable_x64`.
"""

from __future__ import annotations

import numpy as np

from engram_jax.config.schema import EngramConfig
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.table_layout import table_layout

LAYER_SEED_STRIDE = 10007


def layer_multipliers(seed: int, layer_id: int, max_ngram_size: int,
                      compressed_vocab_size: int) -> np.ndarray:
    """Odd int64 multipliers m_0..m_{N-1} of one layer (numpy PCG64, as the reference)."""
    half_bound = max(1, (np.iinfo(np.int64).max // compressed_vocab_size) // 2)
    rng = np.random.default_rng(int(seed + LAYER_SEED_STRIDE * int(layer_id)))
    r = rng.integers(low=0, high=half_bound, size=(max_ngram_size,), dtype=np.int64)
    return r * 2 + 1


def shifted_tokens(ids: np.ndarray, shift: int, pad_value: int,
                   segment_ids: np.ndarray | None = None) -> np.ndarray:
    """ids[:, t - shift], reading `pad_value` before the start (and across segments if given)."""
    if shift == 0:
        return ids
    length = ids.shape[1]
    out = np.full_like(ids, pad_value)
    if shift >= length:  # every position reads before the start
        return out
    out[:, shift:] = ids[:, :length - shift]
    if segment_ids is not None:
        crosses = np.ones(ids.shape, dtype=bool)
        crosses[:, shift:] = segment_ids[:, shift:] != segment_ids[:, :length - shift]
        out[crosses] = pad_value
    return out


def ngram_hash_ids(compressed_ids: np.ndarray, multipliers: np.ndarray,
                   head_sizes: np.ndarray, n_head_per_ngram: int, pad_id: int,
                   segment_ids: np.ndarray | None = None) -> np.ndarray:
    """Per-head row ids of one layer.

    Args:
      compressed_ids: int (B, L) compressed token ids.
      multipliers: int64 (N,) odd multipliers of the layer.
      head_sizes: int64 ((N-1) * H,) prime table size of each head.
      n_head_per_ngram: H.
      pad_id: compressed id read at positions before the sequence start.
      segment_ids: optional int (B, L) document index per position; when given, positions of an
        earlier document read `pad_id` too.

    Returns:
      int32 (B, L, (N-1) * H) with `0 <= ids[..., j] < head_sizes[j]`.
    """
    ids = np.asarray(compressed_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"compressed_ids must have shape (batch, length), got {ids.shape}")
    if segment_ids is not None:
        segment_ids = np.asarray(segment_ids)
        if segment_ids.shape != ids.shape:
            raise ValueError(f"segment_ids shape {segment_ids.shape} != token ids shape "
                             f"{ids.shape}")
    max_ngram_size = multipliers.shape[0]
    sizes = np.asarray(head_sizes, dtype=np.int64).reshape(max_ngram_size - 1, n_head_per_ngram)
    out = np.empty(ids.shape + (sizes.size,), dtype=np.int32)
    mix = ids * multipliers[0]
    for n in range(2, max_ngram_size + 1):
        mix = mix ^ (shifted_tokens(ids, n - 1, pad_id, segment_ids) * multipliers[n - 1])
        heads = slice((n - 2) * n_head_per_ngram, (n - 1) * n_head_per_ngram)
        out[:, :, heads] = mix[:, :, None] % sizes[n - 2]
    return out


def segment_ids_from_separator(token_ids: np.ndarray, separator_id: int) -> np.ndarray:
    """Document index of every position of packed sequences whose documents end in `separator_id`.

    The separator belongs to the document it ends: int32 (B, L), starting at 0 in each row.
    """
    ids = np.asarray(token_ids)
    ends = (ids == separator_id).astype(np.int32)
    return np.cumsum(ends, axis=1) - ends


class NgramHasher:
    """Computes the Engram row ids of every Engram layer from token ids, on the host.

    Args:
      config: the Engram settings.
      compressor: token id -> compressed id map; use `CompressedTokenizer.identity(vocab)` when
        `config.tokenizer_compression` is off.
      separator_id: token id ending each document in packed sequences; needed only when
        `config.reset_at_document_boundary` is on.
    """

    def __init__(self, config: EngramConfig, compressor: CompressedTokenizer,
                 separator_id: int | None = None):
        if config.pad_id >= compressor.vocab_size:
            raise ValueError(f"engram.pad_id={config.pad_id} is outside the tokenizer vocabulary "
                             f"of size {compressor.vocab_size}")
        if config.reset_at_document_boundary and separator_id is None:
            raise ValueError("engram.reset_at_document_boundary needs the document separator id")
        self.config = config
        self.compressor = compressor
        self.separator_id = separator_id
        self.pad_id = int(compressor.lookup[config.pad_id])
        self.layout = table_layout(config)
        self.multipliers = {
            layer_id: layer_multipliers(config.seed, layer_id, config.max_ngram_size,
                                        compressor.compressed_vocab_size)
            for layer_id in config.layer_ids}

    def hash_compressed(self, compressed_ids: np.ndarray, layer_id: int,
                        segment_ids: np.ndarray | None = None) -> np.ndarray:
        """int32 (B, L, (N-1) * H) row ids of one layer from compressed ids."""
        return ngram_hash_ids(compressed_ids, self.multipliers[layer_id],
                              np.asarray(self.layout[layer_id].head_sizes),
                              self.config.n_head_per_ngram,
                              self.pad_id, segment_ids)

    def __call__(self, token_ids: np.ndarray) -> dict[int, np.ndarray]:
        """Row ids of every Engram layer: layer id -> int32 (B, L, (N-1) * H).

        Args:
          token_ids: int (B, L) token ids of the tokenizer (uncompressed).
        """
        token_ids = np.asarray(token_ids)
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must have shape (batch, length), got {token_ids.shape}")
        compressed = self.compressor(token_ids)
        segments = None
        if self.config.reset_at_document_boundary:
            segments = segment_ids_from_separator(token_ids, self.separator_id)
        return {layer_id: self.hash_compressed(compressed, layer_id, segments)
                for layer_id in self.config.layer_ids}
