"""Validation loss over the allocation ratio rho at fixed total and active parameters
(docs/RESULTS.md §2).

  python -m engram_jax.experiments.allocation [--rho 1 0.875 0.75 0.5 0.25 0] [--seeds 1]
      [key=value ...]

rho is the share of the sparse parameters P_sparse held by routed experts; the rest are Engram
tables (paper §3.1). Each point is `engram_jax.accounting.allocate(moe.yaml, rho,
engram_moe.yaml's Engram settings)`: rho = 1 is the pure MoE, rho = 0 keeps only the top-k
routed experts (all active) and puts every sparse parameter in tables. The experts come in whole
units, so the rho actually reached is computed from the parameter counts and is the x axis.
Writes results/allocation/{runs,summary}.csv and allocation.png.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from engram_jax.accounting import allocate, count_parameters
from engram_jax.experiments import sweep
from engram_jax.figures import pyplot, save_figure

DEFAULT_RHOS = (1.0, 0.875, 0.75, 0.5, 0.25, 0.0)


def achieved_rho(config) -> float:
    """Share of P_sparse in routed experts: routed parameters not used by a token / P_sparse."""
    counts = count_parameters(config.model)
    moe = config.model.moe
    idle_routed = counts.routed_experts * (1 - moe.top_k / moe.num_routed_experts)
    return idle_routed / counts.sparse


def runs(rhos, seeds: int = 1, overrides=()) -> list[sweep.Run]:
    engram = sweep.sweep_config("engram_moe.yaml", overrides).model.engram
    out = []
    for seed in range(seeds):
        base = sweep.with_seed(sweep.sweep_config("moe.yaml", overrides), seed)
        for rho in rhos:
            config = sweep.with_model(base, allocate(base.model, rho, engram))
            out.append(sweep.Run(f"rho{rho:g}-seed{seed}", config, {
                "rho_nominal": rho, "rho": round(achieved_rho(config), 4),
                "routed_experts": config.model.moe.num_routed_experts}))
    return out


def plot(rows: list[dict], summary: list[dict], path: pathlib.Path) -> dict:
    """Plots each run and the mean loss per rho with a least-squares parabola through the
    means; returns the parabola's curvature and vertex."""
    plt = pyplot()
    rho = np.array([s["rho"] for s in summary])
    loss = np.array([s["val_loss_mean"] for s in summary])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["rho"] for r in rows], [r["val_loss"] for r in rows], "o", color="tab:red",
            alpha=0.4, label="runs")
    ax.plot(rho, loss, "s", color="tab:red", label=f"mean of {summary[0]['runs']} seed(s)")
    for s in summary:
        ax.annotate(f"{s['routed_experts']} experts", (s["rho"], s["val_loss_mean"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
    fit = {}
    if len(summary) >= 3:
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
    p.add_argument("--seeds", type=int, default=1, help="seeds per ratio (default 1)")
    args = p.parse_args(argv)
    out = pathlib.Path(args.results) / "allocation"
    rows = sweep.run_sweep(runs(args.rho, args.seeds, args.overrides), out,
                           pathlib.Path(args.runs), not args.no_progress)
    summary = sweep.summarise(rows, "rho_nominal")
    for s in summary:
        first = next(r for r in rows if r["rho_nominal"] == s["rho_nominal"])
        s.update(rho=first["rho"], routed_experts=first["routed_experts"],
                 params_engram_tables=first["params_engram_tables"])
    sweep.write_csv(summary, out / "summary.csv")
    fit = plot(rows, summary, out / "allocation.png")
    print(sweep.markdown_table(summary, ["rho_nominal", "rho", "routed_experts", "params_total",
                                         "params_active", "params_engram_tables", "runs",
                                         "val_loss_mean", "val_loss_std",
                                         "val_bits_per_byte_mean"]))
    print(f"quadratic fit through the means: {fit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
