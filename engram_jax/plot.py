"""Plot a run's training and validation loss: `python -m engram_jax.plot RUN_DIR`."""

from __future__ import annotations

import argparse
import json
import pathlib


def read_metrics(run_dir: str | pathlib.Path) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a training run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | pathlib.Path, dpi: int = 110) -> None:
    """Lays out, writes and closes a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_run(run_dir: str | pathlib.Path, out: str | pathlib.Path | None = None) -> pathlib.Path:
    """Writes a PNG of train and validation loss against step; returns its path."""
    plt = pyplot()
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    validation = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    out = pathlib.Path(out) if out else pathlib.Path(run_dir) / "loss.png"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if validation:
        ax.plot(*zip(*validation), "o-", label="validation", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(pathlib.Path(run_dir).absolute().name)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out, dpi=120)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    args = parser.parse_args()
    print(plot_run(args.run_dir, args.out))


if __name__ == "__main__":
    main()
