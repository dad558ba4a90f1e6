"""Parameter accounting: the paper's configs, the small family, hand counts, allocation."""

import dataclasses
import pathlib

import pytest

from engram_jax.accounting import allocate, count_parameters
from engram_jax.config import EngramConfig, ModelConfig, load_model_config

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"


def _load(name):
    return load_model_config(CONFIGS / f"{name}.yaml")


def test_paper_configs_match_the_paper():
    for name in ("paper_moe27b", "paper_engram27b"):
        counts = count_parameters(_load(name))
        assert counts.total == pytest.approx(26.7e9, rel=0.03), name
        assert counts.active == pytest.approx(3.8e9, rel=0.03), name
    engram = count_parameters(_load("paper_engram27b"))
    assert engram.engram_tables + engram.engram_other == pytest.approx(5.7e9, rel=0.03)


def test_hand_count_of_a_dense_model():
    d, f, layers, vocab = 64, 96, 3, 100
    config = ModelConfig(vocab_size=vocab, hidden_size=d, num_layers=layers, num_heads=4,
                         ffn_hidden_size=f, hc_mult=1)
    counts = count_parameters(config, seq_len=128)
    per_layer = 4 * d * d + 3 * d * f + 2 * d  # attention, SwiGLU, two norms
    assert counts.total == counts.active == layers * per_layer + d  # + final norm
    assert counts.embedding == 2 * vocab * d
    assert counts.flops_per_token == 6 * (counts.active + vocab * d) + 12 * layers * d * 128
    # By block: its parameters and its attention; the final norm and the head are the rest.
    assert counts.layer_flops_per_token == (6 * per_layer + 12 * d * 128,) * layers


def test_mhc_and_moe_counts():
    n, d = 4, 32
    config = ModelConfig(vocab_size=50, hidden_size=d, num_layers=2, num_heads=4,
                         ffn_hidden_size=48, hc_mult=n)
    plain = count_parameters(dataclasses.replace(config, hc_mult=1))
    mhc_per_sublayer = n * d * (n * n + 2 * n) + 3 + n + n + n * n
    assert count_parameters(config).total == plain.total + 2 * 2 * mhc_per_sublayer


def test_small_family_is_iso_parameter():
    moe, engram_moe, dense = (count_parameters(_load(n)) for n in ("moe", "engram_moe", "dense"))
    # Allocated rows (padding included) match to 0.1%; padding is not a parameter, and the
    # addressable tables leave the Engram-MoE 0.10% short.
    assert engram_moe.total + engram_moe.engram_table_padding == pytest.approx(moe.total, rel=1e-3)
    assert engram_moe.total == pytest.approx(moe.total, rel=1.5e-3)
    assert 0 < engram_moe.engram_table_padding < 256 * 16
    assert engram_moe.active == pytest.approx(moe.active, rel=0.05)
    assert dense.active == pytest.approx(moe.active, rel=0.01)
    assert engram_moe.engram_tables > 0.15 * engram_moe.total
    assert _load("small") == _load("engram_moe")  # the default run trains the Engram-MoE


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.75])
def test_allocate_keeps_the_total(rho):
    base = _load("moe")
    template = EngramConfig(vocab_size_per_ngram=(2, 2), n_embed_per_ngram=32, n_head_per_ngram=2,
                            layer_ids=(1,), pad_id=1)
    config = allocate(base, rho, template)
    counts, base_counts = count_parameters(config), count_parameters(base)
    assert counts.total == pytest.approx(base_counts.total, rel=2e-3)
    assert config.moe.num_routed_experts == 2 + round(rho * 14)
    sparse_experts = counts.routed_experts * (1 - 2 / config.moe.num_routed_experts)
    base_sparse = base_counts.routed_experts * (1 - 2 / 16)
    assert sparse_experts == pytest.approx(rho * base_sparse, rel=0.1, abs=1)
    assert allocate(base, 1.0, template) is base


def test_allocate_errors():
    template = EngramConfig(vocab_size_per_ngram=(2, 2), layer_ids=(1,))
    with pytest.raises(ValueError, match="MoE base config"):
        allocate(_load("dense"), 0.5, template)
    with pytest.raises(ValueError, match="rho=1.5"):
        allocate(_load("moe"), 1.5, template)
