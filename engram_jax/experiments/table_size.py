"""Validation loss against the number of Engram table slots, backbone fixed
(docs/RESULTS.md §3).

  python -m engram_jax.experiments.table_size [--sizes 528 2112 8450 33800 135200] [key=value ...]

The backbone is configs/engram_moe.yaml's (12 routed experts, Engram in block 1); only
`engram.vocab_size_per_ngram` changes (the start of each order's prime search, so a layer has
about 2 orders x 2 heads x size slots). Fits loss = a + b ln(slots) by least squares.
Writes results/table_size/runs.csv and table_size.png.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from engram_jax.experiments import sweep
from engram_jax.table_layout import table_layout
from engram_jax.figures import pyplot, save_figure

DEFAULT_SIZES = (528, 2112, 8450, 33800, 135200)


def runs(sizes, seed: int = 0, overrides=()) -> list[sweep.Run]:
    base = sweep.with_seed(sweep.sweep_config("engram_moe.yaml", overrides), seed)
    order = base.model.engram.max_ngram_size - 1
    out = []
    for size in sizes:
        config = sweep.with_engram(base, vocab_size_per_ngram=(size,) * order)
        slots = table_layout(config.model.engram).rows
        out.append(sweep.Run(f"slots{size}-seed{seed}", config,
                             {"vocab_size_per_ngram": size, "slots": slots}))
    return out


def log_fit(slots: np.ndarray, loss: np.ndarray) -> dict:
    """Least-squares loss = intercept + slope * ln(slots), with R^2."""
    slope, intercept = np.polyfit(np.log(slots), loss, 1)
    predicted = intercept + slope * np.log(slots)
    total = np.sum((loss - loss.mean()) ** 2)
    r2 = 1 - np.sum((loss - predicted) ** 2) / total if total > 0 else float("nan")
    return {"slope_per_e": float(slope), "slope_per_doubling": float(slope * np.log(2)),
            "intercept": float(intercept), "r2": float(r2)}


def plot(rows: list[dict], path: pathlib.Path) -> dict:
    plt = pyplot()
    slots = np.array([r["slots"] for r in rows], float)
    loss = np.array([r["val_loss"] for r in rows])
    fit = log_fit(slots, loss)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.semilogx(slots, loss, "o", color="tab:red", label="runs")
    grid = np.geomspace(slots.min(), slots.max(), 50)
    ax.semilogx(grid, fit["intercept"] + fit["slope_per_e"] * np.log(grid), "--", color="tab:gray",
                label=f"fit: {fit['slope_per_doubling']:+.4f} nats per doubling, "
                      f"R² {fit['r2']:.2f}")
    ax.set(xlabel="Engram table slots (rows, all heads)", ylabel="validation loss (nats/token)",
           title="table size sweep (backbone fixed)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, path)
    return fit


def main(argv=None) -> int:
    p = sweep.parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES,
                   help="vocab_size_per_ngram values (log-spaced)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if len(args.sizes) < 2:
        p.error("--sizes needs at least two sizes to fit a line")
    out = pathlib.Path(args.results) / "table_size"
    rows = sweep.run_sweep(runs(args.sizes, args.seed, args.overrides), out,
                           pathlib.Path(args.runs), not args.no_progress)
    fit = plot(rows, out / "table_size.png")
    print(sweep.markdown_table(rows, ["vocab_size_per_ngram", "slots", "params_total",
                                      "params_engram_tables", "val_loss", "val_bits_per_byte"]))
    print(f"log fit: {fit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
