"""Engram ablations at equal budget (docs/RESULTS.md §4).

  python -m engram_jax.experiments.ablations [--seed 0] [dotted.key=value ...]

Each variant changes one thing in configs/engram_moe.yaml and keeps its tables:
  no_gate         the gate fixed at 1 (engram.gated: false)
  single_fusion   one gate on the attention input after mHC's pre-mapping (engram.fusion)
  no_compression  hash raw token ids (engram.tokenizer_compression: false)
  no_short_conv   no short convolution (engram.short_conv: false)
  deep_layer      Engram in the last block (3) instead of block 1
The references: the full model, the full model at the next seed (its distance from the full
model is the seed noise to read the other bars against), and configs/moe.yaml (no Engram, same
total parameters).
Writes results/ablations/runs.csv and ablations.png.
"""

from __future__ import annotations

import pathlib
import sys

from engram_jax.experiments import sweep
from engram_jax.figures import pyplot, save_figure

REFERENCES = ("full", "full, next seed", "moe (no Engram)")
VARIANTS = (
    ("no_gate", {"gated": False}),
    ("single_fusion", {"fusion": "single"}),
    ("no_compression", {"tokenizer_compression": False}),
    ("no_short_conv", {"short_conv": False}),
    ("deep_layer", {"layer_ids": (3,)}),
)


def runs(seed: int = 0, overrides=()) -> list[sweep.Run]:
    full = sweep.with_seed(sweep.sweep_config("engram_moe.yaml", overrides), seed)
    moe = sweep.with_seed(sweep.sweep_config("moe.yaml", overrides), seed)
    out = [sweep.Run(f"engram_moe-seed{seed}", full, {"variant": REFERENCES[0]}),
           sweep.Run(f"engram_moe-seed{seed + 1}", sweep.with_seed(full, seed + 1),
                     {"variant": REFERENCES[1]}),
           sweep.Run(f"moe-seed{seed}", moe, {"variant": REFERENCES[2]})]
    out += [sweep.Run(f"{name}-seed{seed}", sweep.with_engram(full, **changes), {"variant": name})
            for name, changes in VARIANTS]
    return out


def plot(rows: list[dict], path: pathlib.Path) -> None:
    plt = pyplot()
    full = next(r["val_loss"] for r in rows if r["variant"] == REFERENCES[0])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    names = [r["variant"] for r in rows]
    deltas = [r["val_loss"] - full for r in rows]
    colours = ["tab:gray" if name in REFERENCES else "tab:red" if d > 0 else "tab:green"
               for name, d in zip(names, deltas)]
    ax.barh(range(len(rows)), deltas, color=colours, alpha=0.7)
    ax.set(yticks=range(len(rows)), yticklabels=names,
           xlabel="validation loss minus the full Engram-MoE's (nats/token)",
           title=f"ablations (full model: {full:.4f}; gray: references)")
    ax.axvline(0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    save_figure(fig, path)


def main(argv=None) -> int:
    p = sweep.parser(__doc__)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = pathlib.Path(args.results) / "ablations"
    rows = sweep.run_sweep(runs(args.seed, args.overrides), out, pathlib.Path(args.runs),
                           not args.no_progress)
    plot(rows, out / "ablations.png")
    print(sweep.markdown_table(rows, ["variant", "params_total", "params_active", "val_loss",
                                      "val_bits_per_byte"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
