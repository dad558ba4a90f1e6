"""Next-token cross-entropy computed a chunk of the sequence at a time.

The LM head's float32 logits are (B, L, V): at the paper's vocabulary (129,280) and 4,096
tokens per chip they and their gradient take about 4 GiB. `chunked_cross_entropy` builds them
for `chunk` positions at a time inside a `lax.scan` whose body is rematerialised, so the
backward pass keeps only the (B, L, D) head input and rebuilds each chunk's logits.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax


def chunk_size(length: int, chunk: int) -> int:
    """The largest divisor of `length` that is at most `chunk` (`length` for chunk 0)."""
    if chunk <= 0 or chunk >= length:
        return length
    return max(c for c in range(1, chunk + 1) if length % c == 0)


def chunked_cross_entropy(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                          targets: jax.Array, chunk: int) -> jax.Array:
    """float32 (B, L) negative log-likelihood of `targets` int (B, L) under
    `logits_fn(hidden)`, where `logits_fn` maps (B, C, D) head inputs to (B, C, V) logits
    position by position; computed `chunk_size(L, chunk)` positions at a time."""
    batch, length = targets.shape
    size = chunk_size(length, chunk)
    nll = lambda h, t: optax.softmax_cross_entropy_with_integer_labels(logits_fn(h), t)
    if size == length:
        return nll(hidden, targets)
    count = length // size
    split = lambda a: a.reshape(batch, count, size, *a.shape[2:]).swapaxes(0, 1)
    body = jax.checkpoint(lambda _, chunk_in: (None, nll(*chunk_in)))
    _, out = jax.lax.scan(body, None, (split(hidden), split(targets)))  # (count, B, size)
    return out.swapaxes(0, 1).reshape(batch, length)
