"""Plot a run's training and validation loss: `python -m engram_jax.plot RUN_DIR`."""

from __future__ import annotations

import argparse
import sys

from engram_jax.train.metrics import plot_run
from engram_jax.train.run_dir import RunDir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    args = parser.parse_args(argv)
    try:
        print(plot_run(RunDir(args.run_dir), args.out))
    except FileNotFoundError as err:
        print(f"plot: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
