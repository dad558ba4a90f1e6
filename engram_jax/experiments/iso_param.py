"""Dense vs MoE vs Engram-MoE at matched parameters, several seeds (docs/RESULTS.md §1).

  python -m engram_jax.experiments.iso_param [--seeds 2] [--models moe engram_moe]
      [dotted.key=value ...]

Models: configs/dense.yaml (the MoE's active parameters, dense), configs/moe.yaml, and
configs/engram_moe.yaml (the MoE's total parameters, a quarter of the routed experts' share
moved into Engram tables), each trained with configs/sweep.yaml's settings. The seed sets the
initialisation and the data order. Writes results/iso_param/{runs,summary}.csv and
iso_param.png.
"""

from __future__ import annotations

import pathlib
import sys

from engram_jax.experiments import sweep
from engram_jax.figures import pyplot, save_figure

MODELS = (("dense", "dense.yaml"), ("moe", "moe.yaml"), ("engram_moe", "engram_moe.yaml"))


def runs(seeds: int, overrides=(), models=tuple(name for name, _ in MODELS)) -> list[sweep.Run]:
    return [sweep.Run(f"{name}-seed{seed}",
                      sweep.with_seed(sweep.sweep_config(preset, overrides), seed), {"model": name})
            for name, preset in MODELS if name in models for seed in range(seeds)]


def paired_differences(rows: list[dict], summary: list[dict], reference: str = "moe") -> None:
    """Adds to each summary row its validation loss minus the reference model's at the same
    seed (same initialisation seed and data order): the mean and each seed's difference."""
    base = {r["seed"]: float(r["val_loss"]) for r in rows if r["model"] == reference}
    for s in summary:
        diffs = [float(r["val_loss"]) - base[r["seed"]] for r in rows
                 if r["model"] == s["model"] and r["seed"] in base]
        s[f"minus_{reference}_mean"] = sum(diffs) / len(diffs) if diffs else float("nan")
        s[f"minus_{reference}_per_seed"] = " ".join(f"{d:+.4f}" for d in diffs)


def plot(rows: list[dict], summary: list[dict], path: pathlib.Path) -> None:
    plt = pyplot()
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = dict(zip([m for m, _ in MODELS], ["tab:gray", "tab:blue", "tab:red"]))
    for row in rows:
        steps, losses = sweep.training_curve(row["run_dir"])
        curves.plot(steps, losses, color=colours[row["model"]], lw=1, alpha=0.8,
                    label=row["model"] if row["seed"] == 0 else None)
    curves.set(xlabel="step", ylabel="training loss (nats/token)", title="training loss",
               ylim=(None, min(r["val_loss"] for r in rows) + 1.5))
    curves.legend()
    curves.grid(alpha=0.3)
    for i, s in enumerate(summary):
        bars.bar(i, s["val_loss_mean"], yerr=s["val_loss_std"], color=colours[s["model"]],
                 alpha=0.6, capsize=6)
        seeds = [float(r["val_loss"]) for r in rows if r["model"] == s["model"]]
        bars.plot([i] * len(seeds), seeds, "ko", ms=4)
    low = min(s["val_loss_mean"] - 3 * max(s["val_loss_std"], 0.01) for s in summary)
    high = max(s["val_loss_mean"] + 3 * max(s["val_loss_std"], 0.01) for s in summary)
    bars.set(xticks=range(len(summary)), ylim=(low, high), ylabel="validation loss (nats/token)",
             xticklabels=[f"{s['model']}\n{s['params_total']:,} total\n{s['params_active']:,} "
                          "active" for s in summary],
             title="final validation loss (bar: mean, line: std, dots: seeds)")
    bars.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def main(argv=None) -> int:
    p = sweep.parser(__doc__)
    p.add_argument("--seeds", type=int, default=2, help="seeds per model (default 2)")
    p.add_argument("--models", nargs="+", choices=[name for name, _ in MODELS],
                   default=[name for name, _ in MODELS], help="which models (default all)")
    args = p.parse_args(argv)
    out = pathlib.Path(args.results) / "iso_param"
    rows = sweep.run_sweep(runs(args.seeds, args.overrides, args.models), out,
                           pathlib.Path(args.runs), not args.no_progress)
    summary = sweep.summarise(rows, "model")
    paired_differences(rows, summary)
    sweep.write_csv(summary, out / "summary.csv")
    plot(rows, summary, out / "iso_param.png")
    print(sweep.markdown_table(summary, ["model", "runs", "params_total", "params_active",
                                         "val_loss_mean", "val_loss_std",
                                         "val_bits_per_byte_mean", "val_bits_per_byte_std",
                                         "minus_moe_mean", "minus_moe_per_seed"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
