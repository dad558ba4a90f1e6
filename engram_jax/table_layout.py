"""Where every Engram head's rows live: prime head sizes, offsets and padded rows, built once.

Each Engram layer has one table holding the rows of all its hash heads (docs/ARCHITECTURE.md,
"Table sizes"). Head j of a layer has a prime number of rows p_j, distinct across every head of
every layer, found by the reference demo's walk: layers in `layer_ids` order, then orders 2..N,
then heads; each (layer, order) starts at `vocab_size_per_ngram[n-2] - 1` and each head takes the
smallest prime above the current start that no earlier head took. Head j's rows start at the
exclusive prefix sum of the sizes before it, and the table is padded with never-addressed rows to
a multiple of `table_row_multiple` so it splits into equal shards.

The hasher (row ids modulo p_j), the module (the table's shape and offsets), the accounting
(addressed rows are parameters, padding is not) and the training metrics (rows touched) all read
this one object: `table_layout(config)`.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from engram_jax.config.schema import ConfigError, EngramConfig

_INT32_MAX = int(np.iinfo(np.int32).max)
# Witnesses that make Miller-Rabin exact for every n < 3.3e24 (so for all int64 values).
_MILLER_RABIN_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """Deterministic primality test for integers below 3.3e24."""
    if n < 2:
        return False
    for p in _MILLER_RABIN_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MILLER_RABIN_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(start: int, taken: set[int]) -> int:
    """The smallest prime > start that is not in `taken`."""
    candidate = start + 1
    while not (is_prime(candidate) and candidate not in taken):
        candidate += 1
    return candidate


@dataclasses.dataclass(frozen=True)
class LayerTable:
    """The table of one Engram layer.

    Attributes:
      layer_id: the block that holds it.
      head_sizes: prime rows of each head, in column order [2-gram heads..., 3-gram heads, ...].
      offsets: first row of each head (exclusive prefix sum of `head_sizes`).
      rows: rows a hash id can address (sum of `head_sizes`).
      padded_rows: rows allocated, `rows` rounded up to a multiple of `table_row_multiple`.
    """

    layer_id: int
    head_sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    rows: int
    padded_rows: int

    @property
    def padding(self) -> int:
        """Allocated rows that no id addresses."""
        return self.padded_rows - self.rows


@dataclasses.dataclass(frozen=True)
class TableLayout:
    """The tables of every Engram layer of a config, in `layer_ids` order."""

    layers: tuple[LayerTable, ...]
    head_dim: int

    def __getitem__(self, layer_id: int) -> LayerTable:
        for layer in self.layers:
            if layer.layer_id == layer_id:
                return layer
        raise KeyError(f"layer {layer_id} has no Engram table (engram.layer_ids="
                       f"{tuple(t.layer_id for t in self.layers)})")

    @property
    def rows(self) -> int:
        """Addressable rows over all layers (the "slots" of the paper's table-size sweep)."""
        return sum(t.rows for t in self.layers)


def _prime_walk(config: EngramConfig) -> dict[int, list[int]]:
    taken: set[int] = set()
    sizes = {}
    for layer_id in config.layer_ids:
        sizes[layer_id] = []
        for start_size in config.vocab_size_per_ngram:
            current = start_size - 1
            for _ in range(config.n_head_per_ngram):
                current = next_prime(current, taken)
                taken.add(current)
                sizes[layer_id].append(current)
    return sizes


@functools.lru_cache(maxsize=64)
def table_layout(config: EngramConfig) -> TableLayout:
    """The layout of `config`'s tables (computed once per config).

    Raises:
      ConfigError: a layer's padded rows do not fit int32 row ids (naming
        `engram.vocab_size_per_ngram`).
    """
    multiple = config.table_row_multiple
    layers = []
    for layer_id, head_sizes in _prime_walk(config).items():
        rows = sum(head_sizes)
        padded = -(-rows // multiple) * multiple
        if padded > _INT32_MAX:
            raise ConfigError(f"engram.vocab_size_per_ngram={config.vocab_size_per_ngram}: layer "
                              f"{layer_id}'s {padded} table rows do not fit int32 row ids")
        offsets = tuple(int(o) for o in np.cumsum([0, *head_sizes[:-1]]))
        layers.append(LayerTable(layer_id, tuple(head_sizes), offsets, rows, padded))
    return TableLayout(tuple(layers), config.head_dim)
