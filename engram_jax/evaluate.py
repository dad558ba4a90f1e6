"""Evaluate a checkpoint: `python -m engram_jax.evaluate --checkpoint DIR [data.key=value ...]`.

DIR is a run's `checkpoints/` directory (the newest readable checkpoint is used) or a run
directory. The model, its config and its tokenizer come from the checkpoint; the data is the
run's own unless `data.*` overrides name another source, e.g.
  python -m engram_jax.evaluate --checkpoint runs/small data.source=text 'data.paths=["x/*.txt"]'
Prints one JSON line: validation loss, perplexity and bits per byte.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

from engram_jax import data as data_lib
from engram_jax.checkpoint import Checkpointer
from engram_jax.config import Config, ConfigError, apply_overrides, from_dict
from engram_jax.model import Transformer
from engram_jax.optim import make_optimizer
from engram_jax.sharding import make_mesh, use_mesh
from engram_jax.tokenizer import TextTokenizer


def load_checkpoint(directory: str | pathlib.Path, data_overrides: list[str] = ()
                    ) -> tuple[Transformer, Config, TextTokenizer, int]:
    """(model with restored weights, config, tokenizer, step) from a checkpoint directory."""
    directory = pathlib.Path(directory)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    checkpointer = Checkpointer(directory)
    steps = checkpointer.steps()
    if not steps:
        raise FileNotFoundError(f"{directory} holds no checkpoint")
    meta = checkpointer.manager.restore(steps[-1], args=_meta_args())["meta"]
    config = from_dict(Config, apply_overrides(meta["config"], list(data_overrides)))
    from tokenizers import Tokenizer

    tokenizer = TextTokenizer(Tokenizer.from_str(meta["tokenizer"]), name=f"{directory} tokenizer")
    mesh = make_mesh(config.sharding) if jax.device_count() > 1 else None
    with use_mesh(config.sharding, mesh) if mesh is not None else contextlib.nullcontext():
        model = Transformer(config.model, rngs=nnx.Rngs(0))
        # The checkpoint holds the optimiser state too; restore it whole, then drop it.
        optimizer = nnx.Optimizer(model, make_optimizer(config.train), wrt=nnx.Param)
    restored = checkpointer.restore(model, optimizer)
    if restored is None:
        raise RuntimeError(f"no checkpoint in {directory} could be read")
    checkpointer.close()
    return model, config, tokenizer, restored[0]


def validation_stream(config: Config, tokenizer: TextTokenizer) -> tuple[np.ndarray, float, int]:
    """The validation split of `config.data` tokenised with `tokenizer` (documents joined by the
    end-of-document token): (token stream, text bytes per token, number of documents)."""
    from engram_jax.corpus import split_documents

    _, texts, report = split_documents(config.data)
    stream = data_lib.tokenize_stream(tokenizer, texts, tokenizer.token_id(data_lib.EOD_TOKEN))
    text_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return stream, text_bytes / len(stream), report.documents


def _meta_args():
    import orbax.checkpoint as ocp

    return ocp.args.Composite(meta=ocp.args.JsonRestore())


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
        model, config, tokenizer, step = load_checkpoint(args.checkpoint, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    from engram_jax.trainer import evaluate

    stream, bytes_per_token, documents = validation_stream(config, tokenizer)
    hasher = data_lib.make_hasher(config.model.engram, tokenizer,
                                  tokenizer.token_id(data_lib.EOD_TOKEN))
    batches = data_lib.batches(stream, config.data.seq_len, config.train.batch_size, hasher,
                               seed=0, repeat=False)  # the sample training evaluates on
    count = min(args.batches or config.train.eval_batches,
                len(data_lib.Windows(stream, config.data.seq_len)) // config.train.batch_size)
    mesh = make_mesh(config.sharding) if jax.device_count() > 1 else None
    result = evaluate(model, batches, mesh, count, bytes_per_token)
    print(json.dumps({"checkpoint_step": step, "batches": count, "data": dataclasses.asdict(
        config.data), "documents": documents, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
