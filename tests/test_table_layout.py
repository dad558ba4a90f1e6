"""The Engram table layout: the demo's prime walk, offsets, padding, and its one source."""

import numpy as np
import pytest

from engram_jax.config import ConfigError, EngramConfig
from engram_jax.table_layout import is_prime, table_layout


def test_demo_table_sizes_match_the_reference_walk():
    layout = table_layout(EngramConfig())
    sizes = {t.layer_id: np.asarray(t.head_sizes) for t in layout.layers}
    assert sizes[1][:3].tolist() == [646403, 646411, 646421]
    assert int(sizes[1].sum()) == 10_344_164
    assert int(sizes[15].sum()) > int(sizes[1].sum())  # later layers' tables are a bit larger
    every = np.concatenate(list(sizes.values()))
    assert len(set(every.tolist())) == every.size and all(is_prime(int(p)) for p in every)


def test_is_prime_matches_a_sieve_and_known_values():
    limit = 20_000
    sieve = np.ones(limit, dtype=bool)
    sieve[:2] = False
    for p in range(2, int(limit ** 0.5) + 1):
        if sieve[p]:
            sieve[p * p::p] = False
    assert [n for n in range(limit) if is_prime(n)] == np.flatnonzero(sieve).tolist()
    assert is_prime(2_147_483_647) and is_prime(2**61 - 1)
    for carmichael in (561, 41041, 825265, 3215031751):
        assert not is_prime(carmichael)
    assert not is_prime(2**61 + 1)


def test_offsets_padding_and_int32_limit():
    config = EngramConfig(vocab_size_per_ngram=(101, 103), n_head_per_ngram=2, n_embed_per_ngram=16,
                          layer_ids=(1, 3), table_row_multiple=64)
    layout = table_layout(config)
    assert [t.layer_id for t in layout.layers] == [1, 3]
    for table in layout.layers:
        assert table.offsets == tuple(np.cumsum([0, *table.head_sizes[:-1]]).tolist())
        assert table.rows == sum(table.head_sizes)
        assert table.padded_rows % 64 == 0 and 0 <= table.padding < 64
    assert layout.rows == sum(t.rows for t in layout.layers)
    assert table_layout(config) is layout  # built once per config
    with pytest.raises(KeyError, match="layer 2 has no Engram table"):
        layout[2]
    with pytest.raises(ConfigError, match="engram.vocab_size_per_ngram=.*do not fit int32"):
        table_layout(EngramConfig(vocab_size_per_ngram=(300_000_000, 300_000_000),
                                  layer_ids=(0,)))
