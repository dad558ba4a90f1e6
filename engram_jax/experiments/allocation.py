"""Validation loss over the allocation ratio rho at fixed total and active parameters
(docs/RESULTS.md §2).

  python -m engram_jax.experiments.allocation [--rho 1 0.875 0.75 0.5 0.25 0] [key=value ...]

rho is the share of the sparse parameters P_sparse held by routed experts; the rest are Engram
tables (DESIGN §5). Each point is `engram_jax.accounting.allocate(moe.yaml, rho,
engram_moe.yaml's Engram settings)`: rho = 1 is the pure MoE, rho = 0 keeps only the top-k
routed experts (all active) and puts every sparse parameter in tables. The experts come in whole
units, so the rho actually reached is computed from the parameter counts and is the x axis.
Writes results/allocation/runs.csv and allocation.png.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from engram_jax.accounting import allocate, count_parameters
from engram_jax.experiments import sweep
from engram_jax.plot import pyplot, save_figure

DEFAULT_RHOS = (1.0, 0.875, 0.75, 0.5, 0.25, 0.0)


def achieved_rho(config) -> float:
    """Share of P_sparse in routed experts: routed parameters not used by a token / P_sparse."""
    counts = count_parameters(config.model)
    moe = config.model.moe
    idle_routed = counts.routed_experts * (1 - moe.top_k / moe.num_routed_experts)
    return idle_routed / counts.sparse


def runs(rhos, seed: int = 0, overrides=()) -> list[sweep.Run]:
    base = sweep.with_seed(sweep.sweep_config("moe.yaml", overrides), seed)
    engram = sweep.sweep_config("engram_moe.yaml", overrides).model.engram
    out = []
    for rho in rhos:
        config = sweep.with_model(base, allocate(base.model, rho, engram))
        out.append(sweep.Run(f"rho{rho:g}-seed{seed}", config, {
            "rho_nominal": rho, "rho": round(achieved_rho(config), 4),
            "routed_experts": config.model.moe.num_routed_experts}))
    return out


def plot(rows: list[dict], path: pathlib.Path) -> dict:
    """Plots loss against rho with a least-squares parabola; returns the parabola's minimum."""
    plt = pyplot()
    rho = np.array([r["rho"] for r in rows])
    loss = np.array([r["val_loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(rho, loss, "o", color="tab:red", label="runs")
    for r in rows:
        ax.annotate(f"{r['routed_experts']} experts", (r["rho"], r["val_loss"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
    fit = {}
    if len(rows) >= 3:
        a, b, c = np.polyfit(rho, loss, 2)
        grid = np.linspace(0, 1, 101)
        ax.plot(grid, np.polyval([a, b, c], grid), "--", color="tab:gray",
                label=f"quadratic fit ({'U' if a > 0 else 'inverted U'})")
        vertex = -b / (2 * a) if a != 0 else float("nan")
        fit = {"curvature": float(a), "vertex_rho": float(vertex),
               "vertex_loss": float(np.polyval([a, b, c], vertex))}
    ax.set(xlabel="rho (share of sparse parameters in routed experts)",
           ylabel="validation loss (nats/token)",
           title=f"allocation at {rows[0]['params_total']:,} total parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    return fit


def main(argv=None) -> int:
    p = sweep.parser(__doc__)
    p.add_argument("--rho", type=float, nargs="+", default=DEFAULT_RHOS, help="ratios to run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = pathlib.Path(args.results) / "allocation"
    rows = sweep.run_sweep(runs(args.rho, args.seed, args.overrides), out,
                           pathlib.Path(args.runs), not args.no_progress)
    fit = plot(rows, out / "allocation.png")
    print(sweep.markdown_table(rows, ["rho_nominal", "rho", "routed_experts", "params_total",
                                      "params_active", "params_engram_tables", "val_loss",
                                      "val_bits_per_byte"]))
    print(f"quadratic fit: {fit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
