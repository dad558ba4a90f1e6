"""Evaluate a checkpoint: `python -m engram_jax.evaluate --checkpoint DIR [data.key=value ...]`.

DIR is a run directory or its `checkpoints/` directory (the newest readable checkpoint is used).
The model, its config and its tokenizer come from the checkpoint; the data is the run's own
unless `data.*` overrides name another source, e.g.
  python -m engram_jax.evaluate --checkpoint runs/small data.source=text 'data.paths=["x/*.txt"]'
(for a run trained on `data.mixture`, add `data.mixture=[]` to evaluate on one other source).
Prints one JSON line: validation loss, perplexity and bits per byte (with `data.mixture`, per
source and their weighted mean, as training reports them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from engram_jax.config import ConfigError
from engram_jax.data.corpus import DataError
from engram_jax.data.pipeline import batches, make_hasher
from engram_jax.data.prepare import end_of_document_id, validation_windows
from engram_jax.sharding.mesh import default_mesh
from engram_jax.train.evaluation import evaluate_sources
from engram_jax.train.run_dir import load_trained


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--checkpoint", required=True, help="run or checkpoints directory")
    parser.add_argument("--batches", type=int, default=None,
                        help="validation batches (default: the run's train.eval_batches)")
    parser.add_argument("overrides", nargs="*", help="data.key=value settings")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if not o.startswith("data.")]
    if bad:
        print(f"evaluate: only data.* settings can be overridden, not {bad[0]!r}",
              file=sys.stderr)
        return 2
    try:
        trained = load_trained(args.checkpoint, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    config, tokenizer = trained.config, trained.tokenizer
    try:
        sources, documents = validation_windows(config.data, tokenizer)
    except (DataError, OSError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    eod_id = end_of_document_id(tokenizer, config.data.eod_token)
    hasher = make_hasher(config, tokenizer, eod_id)
    samples, counts = [], {}
    for name, weight, windows in sources:
        counts[name] = min(args.batches or config.train.eval_batches,
                           len(windows) // config.train.batch_size)
        if counts[name] == 0:
            print(f"evaluate: the validation split{f' of source {name!r}' if name else ''} "
                  f"holds {len(windows)} sequences, fewer than one batch of "
                  f"train.batch_size={config.train.batch_size}", file=sys.stderr)
            return 2
        sample = batches(windows, config.train.batch_size, hasher,
                         seed=0, repeat=False,  # the sample training evaluates on
                         separator_id=eod_id if config.data.document_mask else None)
        samples.append((name, weight, sample, counts[name]))
    result = evaluate_sources(trained.model, samples, default_mesh(config.sharding),
                              tokenizer.token_byte_lengths())
    count = counts[""] if list(counts) == [""] else counts
    print(json.dumps({"checkpoint_step": trained.step, "batches": count,
                      "data": dataclasses.asdict(config.data), "documents": documents,
                      **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
