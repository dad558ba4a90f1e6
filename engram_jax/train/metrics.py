"""Training metrics: pulled from the device every `log_every` steps, checked, written, plotted.

Rows go to the run's `metrics.jsonl` and, when tensorboardX is installed, TensorBoard events:
loss, learning rate, gradient norm, tokens/s, MFU (on devices with a known peak), MoE load,
Engram gates per layer and stream, the share of each Engram table's rows touched so far, and the
validation figures.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Callable

import jax
import numpy as np

from engram_jax.figures import pyplot, save_figure
from engram_jax.table_layout import TableLayout
from engram_jax.train.run_dir import RunDir

# Per-device peak FLOP/s by device kind (dense bf16), for the MFU estimate.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


def device_peak_flops(configured: float | None) -> float | None:
    """`configured` (train.peak_flops), else the known peak of this device kind, else None."""
    if configured:
        return configured
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


class MetricsWriter:
    """metrics.jsonl (appended) and, when tensorboardX is installed, TensorBoard events."""

    def __init__(self, run: RunDir, enabled: bool):
        self.enabled = enabled
        self.path = run.metrics
        self.tensorboard = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self.tensorboard = SummaryWriter(str(run.path))
            except ImportError:
                pass

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class RowUsage:
    """Which rows of each Engram table the training batches have addressed so far."""

    def __init__(self, layout: TableLayout | None):
        self.layout = layout
        self.seen = {t.layer_id: np.zeros(t.rows, bool) for t in layout.layers} if layout else {}

    def add(self, hash_ids: dict[int, np.ndarray]) -> None:
        """Marks the rows of a batch's host-side hash ids {layer: int (b, L, K)}."""
        for layer, ids in hash_ids.items():
            offsets = np.asarray(self.layout[layer].offsets)
            self.seen[layer][(ids + offsets).reshape(-1)] = True

    def fractions(self) -> dict[str, float]:
        return {f"engram_rows_touched/{layer}": float(seen.mean())
                for layer, seen in self.seen.items()}


class TrainLogger:
    """Holds each step's metrics on the device until `flush`, the only host sync of the loop.

    Args:
      writer: where rows go.
      tokens_per_step: global tokens per optimiser step (for tokens/s and MFU).
      schedule: the learning-rate schedule (logged at the flushed step).
      flops_per_token: training FLOPs per token, with `peak_flops` (per device) for MFU.
      row_usage: the Engram table rows touched, logged with every row.
    """

    def __init__(self, writer: MetricsWriter, tokens_per_step: int, schedule: Callable,
                 flops_per_token: float, peak_flops: float | None, row_usage: RowUsage,
                 start_step: int):
        self.writer, self.schedule, self.row_usage = writer, schedule, row_usage
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_flops = peak_flops
        self.pending: list[tuple[int, dict]] = []
        self.clock, self.since_step = time.perf_counter(), start_step
        self.last: dict = {}

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self, step: int) -> dict:
        """Pulls the pending metrics to the host, checks the loss, writes their mean as one row.

        Raises:
          NonFiniteLoss: naming the first step whose loss is NaN or infinite.
        """
        if not self.pending:
            return self.last
        values = jax.device_get([m for _, m in self.pending])
        for (s, _), v in zip(self.pending, values):
            if not math.isfinite(float(v["loss"])):
                raise NonFiniteLoss(f"the training loss is {float(v['loss'])} at step {s}; "
                                    "stopping (the last good checkpoint is kept)")
        elapsed = time.perf_counter() - self.clock
        rate = self.tokens_per_step * (step - self.since_step) / max(elapsed, 1e-9)
        row = {k: float(np.mean([float(v[k]) for v in values])) for k in values[-1]}
        row.update(learning_rate=float(self.schedule(step - 1)), tokens_per_s=rate)
        if self.peak_flops:
            row["mfu"] = rate * self.flops_per_token / (self.peak_flops * jax.device_count())
        row.update(self.row_usage.fractions())
        self.writer.write(step, row)
        self.pending, self.clock, self.since_step, self.last = [], time.perf_counter(), step, row
        return row


def plot_run(run: RunDir, out: str | pathlib.Path | None = None) -> pathlib.Path:
    """Writes a PNG of a run's train and validation loss against step; returns its path."""
    plt = pyplot()
    rows = run.read_metrics()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    validation = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    out = pathlib.Path(out) if out else run.loss_plot
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if validation:
        ax.plot(*zip(*validation), "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run.name)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out, dpi=120)
    return out
