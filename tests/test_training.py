"""Training runs in subprocesses (tiny model, a small text corpus): learning, exact resume after
SIGKILL, SIGTERM checkpoints, non-finite losses; checkpoint fall-back in process."""

import json
import os
import pathlib
import subprocess
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from engram_jax.train.checkpoint import Checkpointer
from engram_jax.train.signals import FAULT_ENV
from conftest import tiny_text_overrides
from processes import collect, free_port

ROOT = pathlib.Path(__file__).parent.parent


def _run(corpus_dir, run_dir, *overrides, fault=None, steps=24, devices=None, launcher=()):
    args = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.yaml"),
            "--no-progress", *tiny_text_overrides(corpus_dir), f"train.run_dir={run_dir}",
            f"train.steps={steps}", "train.log_every=1",
            "train.eval_every=12", "train.eval_batches=1", "train.checkpoint_every=12",
            "train.learning_rate=0.01", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if fault:
        env[FAULT_ENV] = fault
    args[2:2] = list(launcher)
    if launcher:  # one of several processes: the caller collects it
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=ROOT)
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def _losses(run_dir) -> dict[int, float]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def straight_run(corpus_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    result = _run(corpus_dir, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_loss_decreases(straight_run):
    run_dir, result = straight_run
    losses = _losses(run_dir)
    assert np.mean([losses[s] for s in (22, 23, 24)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 1
    assert "final validation loss" in result.stdout and "unigram baseline" in result.stdout
    assert (run_dir / "loss.png").is_file() and (run_dir / "config.yaml").is_file()
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_bits_per_byte" in r for r in rows)
    for key in ("grad_norm", "learning_rate", "tokens_per_s", "engram_gate/1/0",
                "moe_load_max_over_mean/1", "engram_rows_touched/1"):
        assert key in rows[0], key


def test_resume_after_sigkill_is_exact(corpus_dir, straight_run, tmp_path):
    killed = _run(corpus_dir, tmp_path, fault="SIGKILL:12")
    assert killed.returncode == -9
    assert max(_losses(tmp_path)) == 12
    resumed = _run(corpus_dir, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    straight, interrupted = _losses(straight_run[0]), _losses(tmp_path)
    assert [interrupted[s] for s in range(1, 25)] == [straight[s] for s in range(1, 25)]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(corpus_dir, tmp_path):
    result = _run(corpus_dir, tmp_path, fault="SIGTERM:5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGTERM: saved a checkpoint at step 5" in result.stdout
    assert (tmp_path / "checkpoints" / "5").is_dir()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus_dir, tmp_path):
    result = _run(corpus_dir, tmp_path, "train.learning_rate=1e38", "train.clip_norm=0",
                  "train.checkpoint_every=1", "train.warmup_steps=0", steps=12)
    assert result.returncode == 1
    assert "training loss is" in result.stderr and "at step" in result.stderr
    step = int(result.stderr.split("at step ")[1].split(";")[0])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < step


class _Small(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros((3,)))


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    model = _Small()
    optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
    checkpointer = Checkpointer(tmp_path, keep=3, asynchronous=False)
    for step in (1, 2):
        model.w[...] = jnp.full((3,), float(step))
        checkpointer.save(step, model, optimizer, None, {"step": step})
    checkpointer.wait()
    for f in (tmp_path / "2" / "model").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    fresh = _Small()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, meta = Checkpointer(tmp_path).restore(fresh, nnx.Optimizer(
            fresh, optax.sgd(1.0), wrt=nnx.Param))
    assert step == 1 and meta["step"] == 1
    np.testing.assert_array_equal(fresh.w[...], 1.0)
    assert any("checkpoint" in str(w.message) and "/2" in str(w.message) for w in caught)


def test_evaluate_and_plot_command_lines(straight_run, corpus_dir, tmp_path):
    """Evaluate the run's checkpoint on another source (its own validation split, the
    checkpoint's tokenizer), and plot the run."""
    run_dir, _ = straight_run
    other = tmp_path / "other"
    other.mkdir()
    for i in range(20):
        (other / f"{i}.txt").write_text("completely different words here " * 40)
    result = subprocess.run([sys.executable, "-m", "engram_jax.evaluate", "--checkpoint",
                             str(run_dir), "--batches", "1", f"data.paths=['{other}/*.txt']",
                             "data.validation_percent=50"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["checkpoint_step"] == 24 and row["data"]["paths"] == [f"{other}/*.txt"]
    assert np.isfinite(row["val_loss"]) and row["val_bits_per_byte"] > 0
    bad = subprocess.run([sys.executable, "-m", "engram_jax.evaluate", "--checkpoint",
                          str(tmp_path / "missing")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    plot = subprocess.run([sys.executable, "-m", "engram_jax.plot", str(run_dir), "--out",
                           str(tmp_path / "p.png")], capture_output=True, text=True, cwd=ROOT)
    assert plot.returncode == 0 and (tmp_path / "p.png").stat().st_size > 1000


def test_training_on_a_mesh_and_on_two_processes_matches(straight_run, corpus_dir, tmp_path):
    """8 fake devices in one process, and 2 processes of 4: the same losses as one device."""
    steps = 6
    mesh_run = _run(corpus_dir, tmp_path / "mesh", "sharding.fsdp=2", steps=steps, devices=8)
    assert mesh_run.returncode == 0, mesh_run.stderr[-3000:]
    port = free_port()
    outputs = collect([_run(corpus_dir, tmp_path / "multi", steps=steps, devices=4,
                            launcher=["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                      "2", "--process-id", str(i)]) for i in range(2)],
                      timeout=240)
    assert "8 device(s), 2 process(es)" in outputs[0]
    straight = _losses(straight_run[0])
    for run in ("mesh", "multi"):
        losses = _losses(tmp_path / run)
        # The straight run's schedule spans 24 steps, so compare the first step only exactly.
        np.testing.assert_allclose(losses[1], straight[1], rtol=1e-5)
    np.testing.assert_allclose([_losses(tmp_path / "multi")[s] for s in range(1, steps + 1)],
                               [_losses(tmp_path / "mesh")[s] for s in range(1, steps + 1)],
                               rtol=1e-5)
