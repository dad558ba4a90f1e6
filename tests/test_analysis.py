"""The analysis tools: pure functions on known inputs, and each command on a tiny checkpoint."""

import csv
import dataclasses
import math
import pathlib

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.analysis import cka, gates, logit_lens, probe, table_usage
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.config import load_config
from engram_jax.data.hashing import NgramHasher
from engram_jax.nn.model import Transformer
from engram_jax.train.loop import train
from conftest import tiny_text_overrides

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny_run(corpus_dir, tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("analysis_run")
    config = load_config(ROOT / "configs/tiny.yaml", [
        *tiny_text_overrides(corpus_dir), f"train.run_dir={run_dir}", "train.steps=6",
        "train.eval_every=6", "train.eval_batches=1", "train.checkpoint_every=6",
        "train.learning_rate=0.01"])
    train(config, progress=False)
    return run_dir


def _csv(path):
    with open(path) as f:
        return list(csv.reader(f))


def test_linear_cka_is_one_up_to_rotation_scale_and_shift_and_low_for_noise():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 8)).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    chex.assert_trees_all_close(cka.linear_cka(x, x), 1.0, atol=1e-5)
    chex.assert_trees_all_close(cka.linear_cka(x, 3 * x @ rotation.astype(np.float32) + 5), 1.0,
                                atol=1e-4)
    assert float(cka.linear_cka(x, rng.standard_normal((2000, 6)))) < 0.05


def test_kl_divergence_matches_the_formula():
    p = jnp.zeros((3, 2))
    q = jnp.log(jnp.array([[0.25, 0.75]] * 3))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    chex.assert_trees_all_close(logit_lens.kl_divergence(p, q), expected, atol=1e-6)
    chex.assert_trees_all_close(logit_lens.kl_divergence(q, q), 0.0, atol=1e-7)


def test_collision_rates_on_a_hand_made_case():
    keys = np.array([[1, 2], [3, 4], [1, 2], [5, 6]])
    rows = np.array([0, 0, 0, 1])  # (1,2) and (3,4) share row 0
    ngram_rate, token_rate, distinct = table_usage.collision_rates(keys, rows)
    assert (ngram_rate, token_rate, distinct) == (2 / 3, 3 / 4, 3)


def test_table_usage_counts_agree_with_a_brute_force_count():
    config = load_config(ROOT / "configs/tiny.yaml").model.engram
    hasher = NgramHasher(config, CompressedTokenizer.identity(40))
    tokens = np.random.default_rng(0).integers(0, 40, size=(6, 50))
    rows, hits = table_usage.table_usage(hasher, tokens)
    ids = hasher(tokens)[1]
    assert len(rows) == config.num_heads
    collided = {2: [], 3: []}
    for row in rows:
        head_ids = ids[..., row["head"]].reshape(-1)
        assert row["rows_touched"] == len(set(head_ids.tolist()))
        assert hits[(1, row["head"])].sum() == tokens.size
        owners = {}  # row -> distinct n-grams (newest token first, pad before the start)
        for b in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                key = tuple(int(tokens[b, t - k]) if t - k >= 0 else hasher.pad_id
                            for k in range(row["order"]))
                owners.setdefault(int(ids[b, t, row["head"]]), set()).add(key)
        distinct = [key for keys in owners.values() for key in keys]
        shared = [key for keys in owners.values() if len(keys) > 1 for key in keys]
        assert row["distinct_ngrams"] == len(distinct)
        assert row["ngram_collision_rate"] == pytest.approx(len(shared) / len(distinct))
        collided[row["order"]].append(set(shared))
    for row in rows:  # shared in every head of the order
        everywhere = set.intersection(*collided[row["order"]])
        assert row["all_heads_ngram_collision_rate"] == pytest.approx(
            len(everywhere) / row["distinct_ngrams"])


def test_logit_lens_kl_of_the_last_layer_is_zero(tiny_run, tmp_path):
    out = tmp_path / "lens.png"
    assert logit_lens.main(["--checkpoint", str(tiny_run), "--checkpoint", str(tiny_run),
                            "--sequences", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    rows = _csv(out.with_suffix(".csv"))[1:]
    values = np.array([float(r[2]) for r in rows]).reshape(2, -1)
    assert values.shape[1] == 3  # embedding + 2 blocks
    chex.assert_trees_all_close(values[:, -1], np.zeros(2), atol=1e-6)
    assert np.all(values[:, :-1] > 0)
    chex.assert_trees_all_close(values[0], values[1])


def test_cka_of_a_checkpoint_with_itself_is_one_on_the_diagonal(tiny_run, tmp_path):
    out = tmp_path / "cka.png"
    assert cka.main(["--checkpoint", str(tiny_run), "--sequences", "2", "--out", str(out)]) == 0
    matrix = np.array([[float(v) for v in r[1:]] for r in _csv(out.with_suffix(".csv"))[1:]])
    chex.assert_shape(matrix, (3, 3))
    chex.assert_trees_all_close(np.diag(matrix), np.ones(3), atol=1e-4)
    chex.assert_trees_all_close(matrix, matrix.T, atol=1e-5)
    assert np.all((matrix >= 0) & (matrix <= 1 + 1e-5))


def test_gates_are_in_the_open_unit_interval(tiny_run, tmp_path):
    out = tmp_path / "gates.png"
    assert gates.main(["--checkpoint", str(tiny_run), "--text", "the quick brown fox jumps",
                       "--out", str(out)]) == 0
    header, *rows = _csv(out.with_suffix(".csv"))
    assert header[2:] == [f"layer1_branch{b}" for b in range(4)]
    values = np.array([[float(v) for v in r[2:]] for r in rows])
    assert len(rows) >= 3 and np.all((values > 0) & (values < 1))
    assert "".join(r[1] for r in rows) == "the quick brown fox jumps"


def test_gates_with_single_fusion_have_one_branch_and_an_ungated_model_is_refused(tiny_run):
    checkpoint = probe.load(tiny_run)
    tokens = np.arange(10)
    config = checkpoint.config
    single = dataclasses.replace(config, model=dataclasses.replace(
        config.model, engram=dataclasses.replace(config.model.engram, fusion="single")))
    model = Transformer(single.model, rngs=nnx.Rngs(0))
    values = gates.text_gates(dataclasses.replace(checkpoint, model=model, config=single), tokens)
    chex.assert_shape(values[1], (10, 1))
    assert np.all((values[1] > 0) & (values[1] < 1))
    ungated = dataclasses.replace(config, model=dataclasses.replace(
        config.model, engram=dataclasses.replace(config.model.engram, gated=False)))
    with pytest.raises(ValueError, match="gated=false"):
        gates.text_gates(dataclasses.replace(checkpoint, config=ungated), tokens)


def test_table_usage_command(tiny_run, tmp_path):
    out = tmp_path / "usage.png"
    assert table_usage.main(["--checkpoint", str(tiny_run), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [int(r["head"]) for r in rows] == list(range(4))
    for r in rows:
        assert 0 < float(r["fraction_touched"]) <= 1
        assert 0 <= float(r["ngram_collision_rate"]) <= 1
        assert int(r["rows_touched"]) <= int(r["table_size"])


def test_commands_name_a_missing_checkpoint(tmp_path, capsys):
    assert cka.main(["--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
