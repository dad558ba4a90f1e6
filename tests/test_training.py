"""Training runs in subprocesses (tiny model, a small text corpus): learning, exact resume after
SIGKILL, SIGTERM checkpoints, non-finite losses; checkpoint fall-back in process."""

import json
import os
import pathlib
import shutil
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
from processes import WORKER_TIMEOUT_S, collect, free_port

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
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT_S,
                          cwd=ROOT)


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
    assert rows[0]["step"] == 0 and rows[0]["data/documents"] == 40  # the data's counts
    first = next(r for r in rows if r["step"] == 1)
    for key in ("grad_norm", "learning_rate", "tokens_per_s", "engram_gate/1/0",
                "moe_load_max_over_mean/1", "engram_rows_touched/1"):
        assert key in first, key


def test_resume_after_sigkill_is_exact(corpus_dir, straight_run, tmp_path):
    killed = _run(corpus_dir, tmp_path, fault="SIGKILL:12")
    assert killed.returncode == -9
    assert max(_losses(tmp_path)) == 12
    resumed = _run(corpus_dir, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    straight, interrupted = _losses(straight_run[0]), _losses(tmp_path)
    assert [interrupted[s] for s in range(1, 25)] == [straight[s] for s in range(1, 25)]


def test_a_pretokenized_corpus_trains_as_its_text_and_resumes_exactly(corpus_dir,
                                                                      straight_run, tmp_path):
    """The corpus pre-tokenised into ArrayRecord shards (two worker processes) and trained on
    through random access: killed at a checkpoint and resumed, every loss equals the straight
    run's on the text itself."""
    tokens = tmp_path / "tokens"
    made = subprocess.run([sys.executable, "-m", "engram_jax.pretokenize", "--config",
                           str(ROOT / "configs/tiny.yaml"), "--out", str(tokens), "--workers",
                           "2", "--no-progress", *tiny_text_overrides(corpus_dir)],
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, cwd=ROOT)
    assert made.returncode == 0, made.stderr[-3000:]
    corpus = ("data.source=array_record", f"data.paths=['{tokens}']")
    killed = _run(corpus_dir, tmp_path / "run", *corpus, fault="SIGKILL:12")
    assert killed.returncode == -9
    resumed = _run(corpus_dir, tmp_path / "run", *corpus)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    straight, interrupted = _losses(straight_run[0]), _losses(tmp_path / "run")
    assert [interrupted[s] for s in range(1, 25)] == [straight[s] for s in range(1, 25)]

    # A mixture of the shards and a part of the text: each source's validation figures, their
    # weighted mean, and the evaluate command's figures equal the run's.
    mixture = (f"data.mixture=[{{name: shards, weight: 3, paths: ['{tokens}']}}, "
               f"{{name: some, source: text, paths: ['{corpus_dir}/doc1*.txt']}}]")
    mixed = _run(corpus_dir, tmp_path / "mixed", "data.source=stdlib", "data.paths=[]",
                 mixture, "train.eval_batches=1", steps=12)
    assert mixed.returncode == 0, mixed.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "mixed" / "metrics.jsonl").read_text()
            .splitlines()]
    final = [r for r in rows if r.get("step") == 12 and "val_loss" in r][-1]
    np.testing.assert_allclose(final["val_loss"], (3 * final["val_loss/shards"]
                                                   + final["val_loss/some"]) / 4, rtol=1e-12)
    assert final["val_loss/shards"] != final["val_loss/some"]
    evaluated = subprocess.run([sys.executable, "-m", "engram_jax.evaluate", "--checkpoint",
                                str(tmp_path / "mixed"), "--batches", "1"],
                               capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
                               cwd=ROOT)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    row = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert row["batches"] == {"shards": 1, "some": 1}
    for key in ("val_loss", "val_loss/shards", "val_loss/some"):
        np.testing.assert_allclose(row[key], final[key], rtol=1e-6, err_msg=key)


def test_host_tables_resume_exactly_after_sigkill_and_evaluate_as_trained(corpus_dir,
                                                                          tmp_path):
    """`engram.table_placement: host`: killed at a checkpoint and resumed, the same losses as a
    straight run; its checkpoint (the host tables put on the device) evaluates to the run's own
    final validation loss."""
    host = ("train.table_optimizer=sparse_adam", "model.engram.table_placement=host")
    straight = _run(corpus_dir, tmp_path / "straight", *host)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "Engram tables in host memory" in straight.stdout
    killed = _run(corpus_dir, tmp_path / "killed", *host, fault="SIGKILL:12")
    assert killed.returncode == -9
    resumed = _run(corpus_dir, tmp_path / "killed", *host)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    straight_losses, interrupted = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert [interrupted[s] for s in range(1, 25)] == [straight_losses[s] for s in range(1, 25)]
    rows = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text()
            .splitlines()]
    final = [r["val_loss"] for r in rows if r.get("step") == 24 and "val_loss" in r][-1]
    result = subprocess.run([sys.executable, "-m", "engram_jax.evaluate", "--checkpoint",
                             str(tmp_path / "straight"), "--batches", "1"],
                            capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["checkpoint_step"] == 24
    np.testing.assert_allclose(row["val_loss"], final, rtol=1e-6)


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


def test_a_checkpoint_of_other_shapes_is_refused_not_called_corrupt(tmp_path):
    from engram_jax.train.checkpoint import CheckpointMismatch

    model = _Small()
    checkpointer = Checkpointer(tmp_path, asynchronous=False)
    checkpointer.save(1, model, nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param), None, {})
    checkpointer.close()

    class _Wider(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((4,)))

    wider = _Wider()
    with pytest.raises(CheckpointMismatch, match=r"other shapes.*\(3,\) -> \(4,\)"):
        Checkpointer(tmp_path).restore(wider, nnx.Optimizer(wider, optax.sgd(1.0),
                                                            wrt=nnx.Param), set_aside=True)
    assert [p.name for p in tmp_path.iterdir() if p.name[0].isdigit()] == ["1"]  # left as it is


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
                            capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, cwd=ROOT)
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


def test_training_on_a_mesh_and_on_two_processes_matches(corpus_dir, tmp_path):
    """The real trainer (AdamW, clipping, warm-up and cosine, the balancing bias) for 6 steps
    on one device, on 8 fake devices in one process, and on 2 processes of 4: the same losses
    at every step."""
    steps = 6
    single = _run(corpus_dir, tmp_path / "single", steps=steps)
    assert single.returncode == 0, single.stderr[-3000:]
    mesh_run = _run(corpus_dir, tmp_path / "mesh", "sharding.fsdp=2", steps=steps, devices=8)
    assert mesh_run.returncode == 0, mesh_run.stderr[-3000:]
    port = free_port()
    outputs = collect([_run(corpus_dir, tmp_path / "multi", steps=steps, devices=4,
                            launcher=["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                      "2", "--process-id", str(i)]) for i in range(2)])
    assert "8 device(s), 2 process(es)" in outputs[0]
    losses = {run: [_losses(tmp_path / run)[s] for s in range(1, steps + 1)]
              for run in ("single", "mesh", "multi")}
    for run in ("mesh", "multi"):
        np.testing.assert_allclose(losses[run][0], losses["single"][0], rtol=1e-5, err_msg=run)
        # Routing is discrete: rounding that differs between layouts can flip a near-tied
        # expert choice or balancing-bias sign, which moves later losses by about 1e-3.
        np.testing.assert_allclose(losses[run], losses["single"], rtol=2e-3, err_msg=run)


def test_a_run_directory_knows_its_config_tokenizer_and_data(corpus_dir, tmp_path):
    """Run 12 steps, then start it again: finished; finished without result.json (rebuilt
    from the records); with more files in the corpus (refused, the tokenizer untouched, then
    accepted with train.resume=allow and still the run's own tokenizer); with another model
    (refused, even with allow); eval_batches beyond the validation split (clamped)."""
    corpus, run_dir = tmp_path / "corpus", tmp_path / "run"
    shutil.copytree(corpus_dir, corpus)
    first = _run(corpus, run_dir, "train.eval_batches=1000", steps=12)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "is more than the" in first.stderr and "evaluating on" in first.stderr
    result = json.loads((run_dir / "result.json").read_text())
    tokenizer = (run_dir / "tokenizer" / "tokenizer.json").read_bytes()
    config_yaml = (run_dir / "config.yaml").read_text()

    again = _run(corpus, run_dir, steps=12)
    assert again.returncode == 0 and "finished at step 12" in again.stdout, again.stderr[-3000:]
    (run_dir / "result.json").unlink()  # as if killed between the checkpoint and result.json
    again = _run(corpus, run_dir, steps=12)
    assert again.returncode == 0 and "finished at step 12" in again.stdout, again.stderr[-3000:]
    assert json.loads((run_dir / "result.json").read_text())["val_loss"] == result["val_loss"]

    for i in range(3):
        (corpus / f"new{i}.txt").write_text("words never seen before in this corpus " * 50)
    refused = _run(corpus, run_dir, steps=14)
    assert refused.returncode == 2 and "the data differs" in refused.stderr
    assert "Traceback" not in refused.stderr
    changed = _run(corpus, run_dir, "model.hidden_size=64", "train.resume=allow", steps=14)
    assert changed.returncode == 2 and "parameters of other shapes" in changed.stderr
    changed = _run(corpus, run_dir, "model.hidden_size=64", steps=14)
    assert changed.returncode == 2 and "model.hidden_size: 32 -> 64" in changed.stderr
    allowed = _run(corpus, run_dir, "train.resume=allow", steps=14)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "resumed from" in allowed.stdout and "finished" not in allowed.stdout
    assert (run_dir / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer
    assert (run_dir / "config.yaml").read_text() == config_yaml
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["12", "14"]
    assert sorted(p.name for p in run_dir.glob("result*.json")) == ["result-step12.json",
                                                                     "result.json"]
    from engram_jax.train.run_dir import RunDir, load_trained

    steps = {}
    for step in (12, 14):
        checkpointer = RunDir(run_dir).checkpointer()
        steps[step] = checkpointer.read_meta(step)["tokenizer"]["sha256"]
        checkpointer.close()
    assert steps[12] == steps[14]
    assert load_trained(run_dir).tokenizer.fingerprint() == steps[12]


def test_evaluation_skips_an_unreadable_newest_checkpoint(straight_run, tmp_path):
    from engram_jax.train.run_dir import load_trained

    run_dir = tmp_path / "run"
    shutil.copytree(straight_run[0], run_dir)
    for f in (run_dir / "checkpoints" / "24" / "meta").rglob("*"):
        if f.is_file():
            f.write_bytes(b"{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained = load_trained(run_dir)
    assert trained.step == 12
    assert any("/24" in str(w.message) and "could not be read" in str(w.message) for w in caught)
