"""Train a model: `python train.py --config configs/small.yaml [dotted.key=value ...]`.

Resumes from the newest readable checkpoint in `train.run_dir` when there is one and the config
matches it (`train.resume`: auto, allow, must, never); a finished run prints its final metrics.
Bad config or data is one line on stderr and exit code 2. Examples:
  python train.py                                   # the default: configs/small.yaml
  python train.py --config configs/tiny.yaml train.steps=50 train.run_dir=runs/tiny
  python train.py data.source=text 'data.paths=["corpus/*.txt"]'
  python train.py --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0   # each host
"""

import argparse
import sys

from engram_jax.config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--config", default="configs/small.yaml",
                        help="YAML file, or the name of a packaged preset (tiny, small, ...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--coordinator", help="host:port of process 0, for multi-process runs")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value settings")
    args = parser.parse_args(argv)
    if args.coordinator:
        import jax

        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    try:
        config = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 2
    from engram_jax.data.corpus import DataError
    from engram_jax.train.loop import train
    from engram_jax.train.metrics import NonFiniteLoss

    try:
        train(config, progress=not args.no_progress)
    except (ConfigError, DataError, OSError, NonFiniteLoss) as err:  # one line, no traceback
        print(f"train.py: {err}", file=sys.stderr)
        return 1 if isinstance(err, NonFiniteLoss) else 2  # a diverged run, or bad input
    return 0


if __name__ == "__main__":
    sys.exit(main())
