"""N-gram hash ids of one new token per sequence, on the device, bit-identical to `NgramHasher`.

Decoding needs the ids of each new token as soon as it is sampled. `NgramHasher` mixes the last
N compressed ids in int64 (products with odd per-layer multipliers, XOR, modulo a prime per
head); JAX without `jax_enable_x64` has no int64, so the same arithmetic runs in pairs of uint32
words (high, low):

  products  c * m_j for every compressed id c and multiplier j are tabulated once on the host
            (exact int64 in numpy) as (high, low) words: a gather replaces the multiply;
  XOR       word by word;
  modulo    the 64-bit value is reduced bit by bit, r <- 2r + bit, minus p when r >= p, which
            stays below 2^32 because every head size p is below 2^31.

The decode loop then stays one compiled `lax.while_loop` with no host round trip per token
(bench/decode.py measures the alternative, hashing on the host; README, "Generation").

Per sequence the state is the last N - 1 compressed ids, oldest first (`history`): the pad id
before the start and, with `reset_at_document_boundary`, after each end-of-document token, so
every id equals `NgramHasher` over the whole sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.data.hashing import NgramHasher

WORD_BITS = 32


def product_words(compressed_vocab_size: int, multipliers: np.ndarray) -> np.ndarray:
    """uint32 (V', N, 2): the (high, low) words of c * m_j for every compressed id c."""
    ids = np.arange(compressed_vocab_size, dtype=np.int64)[:, None]
    products = ids * np.asarray(multipliers, np.int64)[None, :]  # exact: no product overflows
    words = products.view(np.uint64)
    return np.stack([words >> WORD_BITS, words & 0xFFFFFFFF], axis=-1).astype(np.uint32)


def mod_words(high: jax.Array, low: jax.Array, modulus: jax.Array) -> jax.Array:
    """(high * 2^32 + low) mod `modulus`, elementwise on uint32 arrays; modulus < 2^31."""

    def step(i, r):
        word = jnp.where(i < WORD_BITS, high, low)
        bit = (word >> (WORD_BITS - 1 - i % WORD_BITS).astype(jnp.uint32)) & 1
        r = (r << 1) | bit
        return jnp.where(r >= modulus, r - modulus, r)

    modulus = jnp.broadcast_to(modulus, high.shape)
    return jax.lax.fori_loop(0, 2 * WORD_BITS, step, jnp.zeros_like(modulus))


@jax.tree_util.register_pytree_node_class
class DeviceHasher:
    """The arrays of a `NgramHasher` that hashing on the device needs, and the step functions;
    a pytree (its arrays are leaves), so it passes into compiled functions as an argument.

    Attributes:
      compress: int32 (vocab,) token id -> compressed id (ids past the tokenizer's read pad).
      products: layer -> uint32 (V', N, 2) product words (`product_words`).
      head_sizes: layer -> uint32 (K,) prime size of each head, heads grouped by order.
      pad_id: the compressed pad id; separator_id: the end-of-document token id or None
        (`reset_at_document_boundary` off).
    """

    def __init__(self, hasher: NgramHasher, vocab_size: int):
        config = hasher.config
        self.max_ngram_size = config.max_ngram_size
        self.heads_per_order = config.n_head_per_ngram
        self.pad_id = hasher.pad_id
        self.separator_id = hasher.separator_id if config.reset_at_document_boundary else None
        lookup = np.full(max(vocab_size, hasher.compressor.vocab_size), hasher.pad_id, np.int32)
        lookup[:hasher.compressor.vocab_size] = hasher.compressor.lookup
        self.compress = jnp.asarray(lookup)
        self.products, self.head_sizes = {}, {}
        for layer, multipliers in hasher.multipliers.items():
            sizes = np.asarray(hasher.layout[layer].head_sizes, np.int64)
            if sizes.max() >= 2 ** (WORD_BITS - 1):
                raise ValueError(f"layer {layer} has a head of {sizes.max()} rows: hashing on the "
                                 f"device needs head sizes below 2^{WORD_BITS - 1}")
            self.products[layer] = jnp.asarray(
                product_words(hasher.compressor.compressed_vocab_size, multipliers))
            self.head_sizes[layer] = jnp.asarray(sizes.astype(np.uint32))

    def tree_flatten(self):
        static = (self.max_ngram_size, self.heads_per_order, self.pad_id, self.separator_id)
        return (self.compress, self.products, self.head_sizes), static

    @classmethod
    def tree_unflatten(cls, static, arrays):
        hasher = cls.__new__(cls)
        hasher.max_ngram_size, hasher.heads_per_order, hasher.pad_id, hasher.separator_id = static
        hasher.compress, hasher.products, hasher.head_sizes = arrays
        return hasher

    def initial_history(self, batch: int) -> jax.Array:
        """int32 (B, N - 1) history of an empty sequence: all pad."""
        return jnp.full((batch, self.max_ngram_size - 1), self.pad_id, jnp.int32)

    def hash_ids(self, history: jax.Array, tokens: jax.Array) -> dict[int, jax.Array]:
        """Layer -> int32 (B, K) row ids of new tokens int (B,) after `history` (B, N - 1)."""
        window = jnp.concatenate([history, self.compress[tokens][:, None]], axis=1)  # oldest first
        out = {}
        for layer, products in self.products.items():
            high = low = None
            orders = []
            for j in range(self.max_ngram_size):  # j = 0: the new token
                words = products[window[:, -1 - j], j]  # (B, 2)
                high = words[:, 0] if high is None else high ^ words[:, 0]
                low = words[:, 1] if low is None else low ^ words[:, 1]
                if j >= 1:  # order n = j + 1 uses the new token and the j before it
                    orders.append(jnp.repeat(jnp.stack([high, low], -1)[:, None],
                                             self.heads_per_order, axis=1))
            mixed = jnp.concatenate(orders, axis=1)  # (B, K, 2)
            out[layer] = mod_words(mixed[..., 0], mixed[..., 1],
                                   self.head_sizes[layer][None, :]).astype(jnp.int32)
        return out

    def next_history(self, history: jax.Array, tokens: jax.Array) -> jax.Array:
        """The history after appending tokens int (B,): shifted, or all pad after a separator."""
        shifted = jnp.concatenate([history[:, 1:], self.compress[tokens][:, None]], axis=1)
        if self.separator_id is None:
            return shifted
        return jnp.where((tokens == self.separator_id)[:, None], self.pad_id, shifted)


def next_history(hasher: NgramHasher, history: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """`DeviceHasher.next_history` on the host: int32 (B, N - 1) after tokens int (B,)."""
    shifted = np.concatenate([history[:, 1:], hasher.compressor(tokens)[:, None]], axis=1)
    if hasher.config.reset_at_document_boundary:
        shifted[np.asarray(tokens) == hasher.separator_id] = hasher.pad_id
    return shifted.astype(np.int32)


def prompt_history(hasher: NgramHasher, prompts: list[list[int]]) -> np.ndarray:
    """int32 (B, N - 1) history after each prompt (token ids), as feeding the prompt token by
    token through `next_history` leaves it."""
    out = np.full((len(prompts), hasher.config.max_ngram_size - 1), hasher.pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        for token in prompt:
            out[row:row + 1] = next_history(hasher, out[row:row + 1], np.asarray([token]))
    return out
