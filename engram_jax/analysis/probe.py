"""What the analysis tools share: a loaded checkpoint, validation inputs, per-layer states."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import pathlib
import sys
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.config.schema import Config
from engram_jax.data.pipeline import make_hasher
from engram_jax.data.prepare import end_of_document_id, validation_windows
from engram_jax.data.tokenizer import TextTokenizer
from engram_jax.nn.model import Transformer
from engram_jax.train.run_dir import load_trained


@dataclasses.dataclass
class Checkpoint:
    """A restored model with its config, tokenizer, step and a short label for plots."""

    model: Transformer
    config: Config
    tokenizer: TextTokenizer
    step: int
    label: str

    def hash_ids(self, tokens: np.ndarray) -> dict[int, jax.Array] | None:
        """This model's Engram row ids of int tokens (B, L); None without Engram."""
        hasher = make_hasher(self.config, self.tokenizer,
                             end_of_document_id(self.tokenizer, self.config.data.eod_token))
        if hasher is None:
            return None
        return {layer: jnp.asarray(ids) for layer, ids in hasher(np.asarray(tokens)).items()}


def load(path: str | pathlib.Path) -> Checkpoint:
    """Restores the newest checkpoint of a run directory or its `checkpoints/` directory."""
    trained = load_trained(path)
    return Checkpoint(trained.model, trained.config, trained.tokenizer, trained.step,
                      trained.run.name)


def same_tokenizer(a: Checkpoint, b: Checkpoint) -> None:
    """Raises unless the two checkpoints tokenise text identically (needed to compare them)."""
    if a.tokenizer.tokenizer.to_str() != b.tokenizer.tokenizer.to_str():
        raise ValueError(f"checkpoints {a.label} and {b.label} use different tokenizers, so their "
                         "layers cannot be compared on the same tokens")


def validation_tokens(checkpoint: Checkpoint, sequences: int, seq_len: int | None = None,
                      seed: int = 0) -> np.ndarray:
    """int32 (sequences, seq_len) windows of the checkpoint's validation split (a mixture's
    sources' splits one after another), drawn without replacement with a fixed seed (seq_len
    defaults to the run's; a pre-tokenised corpus has its own)."""
    seq_len = seq_len or checkpoint.config.data.seq_len
    data = dataclasses.replace(checkpoint.config.data, seq_len=seq_len)
    windows = [w for _, _, w in validation_windows(data, checkpoint.tokenizer)[0]]
    starts = np.cumsum([0] + [len(w) for w in windows])
    if sequences > starts[-1]:
        raise ValueError(f"the validation split holds {starts[-1]} windows of {seq_len} tokens, "
                         f"fewer than the {sequences} asked for")
    order = np.sort(np.random.default_rng(seed).permutation(starts[-1])[:sequences])
    source = np.searchsorted(starts, order, side="right") - 1
    return np.concatenate([windows[s].read(order[source == s] - starts[s])[:, :seq_len]
                           for s in range(len(windows)) if (source == s).any()])


@nnx.jit
def _merged_states(model: Transformer, tokens: jax.Array, hash_ids) -> list[jax.Array]:
    return [model.merge(s) for s in model.hidden_states(tokens, hash_ids)]


def layer_states(checkpoint: Checkpoint, tokens: np.ndarray) -> list[jax.Array]:
    """The merged residual streams (B, L, D) after the embedding and after every block
    (num_layers + 1 of them): what the final norm and head would read if the model ended there."""
    return _merged_states(checkpoint.model, jnp.asarray(tokens), checkpoint.hash_ids(tokens))


def figure_path(out: str | None, default: str) -> pathlib.Path:
    """`out`, or results/analysis/<default>; its directory is created."""
    path = pathlib.Path(out) if out else pathlib.Path("results/analysis") / default
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def command_parser(doc: str, figure: str, compare: bool = False) -> argparse.ArgumentParser:
    """An analysis command's parser from its module docstring, with --checkpoint (given once, or
    once or twice when `compare`) and --out (default results/analysis/<figure>)."""
    lines = doc.splitlines()
    parser = argparse.ArgumentParser(description=lines[0], epilog="\n".join(lines[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if compare:
        parser.add_argument("--checkpoint", action="append", required=True,
                            help="run or checkpoints directory; give one or two")
    else:
        parser.add_argument("--checkpoint", required=True, help="run or checkpoints directory")
    parser.add_argument("--out", help=f"PNG path (default results/analysis/{figure})")
    return parser


def run_comparison(doc: str, command: str, sequences: int, argv,
                   report: Callable[[pathlib.Path, list[Checkpoint], np.ndarray], None]) -> int:
    """Runs a command comparing one or two checkpoints (`--checkpoint` once or twice,
    `--sequences`, `--out`, default figure `<command>.png`): loads checkpoints that tokenise
    alike and int32 input tokens (sequences, seq_len) of the first one's validation split, then
    calls `report(figure path, checkpoints, tokens)`. Returns the exit code: 2, with the reason on
    stderr after `command`, when a checkpoint cannot be loaded."""
    parser = command_parser(doc, f"{command}.png", compare=True)
    parser.add_argument("--sequences", type=int, default=sequences,
                        help="validation windows to use")
    args = parser.parse_args(argv)
    if len(args.checkpoint) > 2:
        parser.error("give at most two --checkpoint")
    try:
        checkpoints = [load(path) for path in args.checkpoint]
        same_tokenizer(checkpoints[0], checkpoints[-1])
        tokens = validation_tokens(checkpoints[0], args.sequences)[:, :-1]
    except (FileNotFoundError, ValueError) as err:
        print(f"{command}: {err}", file=sys.stderr)
        return 2
    report(figure_path(args.out, f"{command}.png"), checkpoints, tokens)
    return 0


def write_table(figure: pathlib.Path, header: Sequence, rows: Iterable[Sequence]) -> None:
    """Writes `rows` under `header` as the CSV beside `figure`, and says where both are."""
    table = figure.with_suffix(".csv")
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    print(f"wrote {figure} and {table}")
