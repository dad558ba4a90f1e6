"""The sweep machinery of engram_jax.experiments (the sweeps themselves are scripts, not tests)."""

import dataclasses
import json

import numpy as np
import pytest

from engram_jax.accounting import count_parameters
from engram_jax.experiments import ablations, allocation, iso_param, sweep, table_size


def test_digest_ignores_the_run_directory_and_sees_everything_else():
    config = sweep.sweep_config("tiny.yaml")
    moved = dataclasses.replace(config, train=dataclasses.replace(config.train, run_dir="x"))
    assert sweep.config_digest(moved) == sweep.config_digest(config)
    assert sweep.config_digest(sweep.with_seed(config, 1)) != sweep.config_digest(config)
    assert sweep.config_digest(sweep.with_engram(config, gated=False)) != sweep.config_digest(
        config)


def test_a_finished_run_is_read_back_under_any_name(tmp_path):
    config = sweep.sweep_config("tiny.yaml")
    run_dir = tmp_path / f"first-name-{sweep.config_digest(config)}"
    run_dir.mkdir()
    result = {"val_loss": 3.5, "val_bits_per_byte": 1.2, "loss": 3.0, "unigram_loss": 5.0,
              "tokens_per_s": 10.0, "wall_s": 1.0, "step": 160}  # as the trainer writes it
    (run_dir / "result.json").write_text(json.dumps(result))
    row = sweep.run_one(sweep.Run("other-name", config, {"kind": "x"}), tmp_path)
    assert (row["name"], row["kind"], row["val_loss"], row["run_dir"]) == (
        "other-name", "x", 3.5, str(run_dir))
    assert row["params_total"] == count_parameters(config.model).total


def test_summarise_gives_mean_and_sample_std():
    rows = [{"model": "a", "val_loss": v, "val_bits_per_byte": 2 * v, "params_total": 1,
             "params_active": 1} for v in (1.0, 2.0, 3.0)]
    (summary,) = sweep.summarise(rows, "model")
    assert (summary["runs"], summary["val_loss_mean"], summary["val_loss_std"]) == (3, 2.0, 1.0)
    assert summary["val_bits_per_byte_std"] == 2.0


def test_sweep_points_hold_their_budgets():
    moe_total = count_parameters(sweep.sweep_config("moe.yaml").model).total
    points = allocation.runs((1.0, 0.5, 0.0), seeds=2)
    assert [p.config.train.seed for p in points] == [0, 0, 0, 1, 1, 1]
    assert [p.fields["rho"] for p in points][:3:2] == [1.0, 0.0]
    for p in points:
        counts = count_parameters(p.config.model)
        assert moe_total - 256 * 16 < counts.total <= moe_total  # within one padding unit
    assert len(iso_param.runs(2)) == 6
    names = [r.name for r in ablations.runs()]
    assert len(set(names)) == len(names) == 8
    ablated = {r.fields["variant"]: r.config.model.engram for r in ablations.runs()}
    assert ablated["deep_layer"].layer_ids == (3,) and not ablated["no_gate"].gated
    slots = [p.fields["slots"] for p in table_size.runs((100, 400, 1600))]
    assert slots == sorted(slots) and slots[-1] > 10 * slots[0]


def test_log_fit_recovers_a_known_line():
    slots = np.array([1e3, 1e4, 1e5, 1e6])
    fit = table_size.log_fit(slots, 4.0 - 0.05 * np.log(slots))
    assert fit["slope_per_e"] == pytest.approx(-0.05) and fit["r2"] == pytest.approx(1.0)


def test_paired_differences_are_taken_at_equal_seeds():
    rows = [{"model": m, "seed": seed, "val_loss": v, "val_bits_per_byte": 0.0,
             "params_total": 1, "params_active": 1}
            for m, seed, v in (("moe", 0, 5.0), ("moe", 1, 4.0), ("engram_moe", 0, 4.9),
                               ("engram_moe", 1, 4.2))]
    summary = sweep.summarise(rows, "model")
    iso_param.paired_differences(rows, summary)
    assert summary[0]["minus_moe_mean"] == 0.0
    assert summary[1]["minus_moe_mean"] == pytest.approx(0.05)
    assert summary[1]["minus_moe_per_seed"] == "-0.1000 +0.2000"
