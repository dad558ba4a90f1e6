"""Engram table usage on the validation split: rows touched, hits per row, hash collisions.

  python -m engram_jax.analysis.table_usage --checkpoint RUN [--sequences N]
      [--out results/analysis/table_usage.png]

Per hash head: how many of its rows the validation tokens touch, the distribution of hits per
row (a rank/frequency "Zipf" plot, log-log), and the collision rate: the share of distinct
(compressed) n-grams whose row also holds another distinct n-gram seen, the share of tokens
that read such a shared row, and the share of n-grams that share a row in every head of their
order (what multi-head hashing keeps low). Only the tokenizer and the config are used, not the
weights. Writes the PNG and a CSV with one row per head.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from engram_jax.analysis import probe
from engram_jax.data.hashing import NgramHasher, segment_ids_from_separator, shifted_tokens
from engram_jax.data.pipeline import make_hasher
from engram_jax.data.prepare import end_of_document_id, validation_windows


def ngram_keys(compressed: np.ndarray, order: int, pad_id: int,
               segment_ids: np.ndarray | None = None) -> np.ndarray:
    """(B * L, order) the compressed n-gram ending at each position, newest token first, with
    `pad_id` where the hasher reads padding."""
    columns = [shifted_tokens(compressed, k, pad_id, segment_ids) for k in range(order)]
    return np.stack(columns, axis=-1).reshape(-1, order)


def shared_ngrams(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For n-gram keys (N, n) and their rows (N,): (bool per distinct n-gram, in sorted key
    order: its row also holds another distinct n-gram; index (N,) of each position's n-gram)."""
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    _, row_index, per_row = np.unique(rows[first], return_inverse=True, return_counts=True)
    return per_row[row_index] > 1, inverse.reshape(-1)


def collision_rates(keys: np.ndarray, rows: np.ndarray) -> tuple[float, float, int]:
    """(share of distinct n-grams sharing a row with another, share of positions reading such
    a row, number of distinct n-grams) for n-gram keys (N, n) and their rows (N,)."""
    shared, inverse = shared_ngrams(keys, rows)
    return float(shared.mean()), float(shared[inverse].mean()), len(shared)


def table_usage(hasher: NgramHasher, tokens: np.ndarray) -> tuple[list[dict], dict]:
    """Per-head usage rows and {(layer, head): hits per row (table_size,)} for int tokens (B, L)."""
    config = hasher.config
    compressed = hasher.compressor(np.asarray(tokens))
    segments = (segment_ids_from_separator(tokens, hasher.separator_id)
                if config.reset_at_document_boundary else None)
    keys = {order: ngram_keys(compressed, order, hasher.pad_id, segments)
            for order in range(2, config.max_ngram_size + 1)}
    rows, hits = [], {}
    for layer, ids in hasher(tokens).items():
        in_every_head = {}  # order -> distinct n-grams that share a row in all of its heads
        for head in range(ids.shape[-1]):
            order = 2 + head // config.n_head_per_ngram
            size = hasher.layout[layer].head_sizes[head]
            head_rows = ids[..., head].reshape(-1)
            counts = np.bincount(head_rows, minlength=size)
            shared, inverse = shared_ngrams(keys[order], head_rows)
            in_every_head[order] = in_every_head.get(order, shared) & shared
            hits[(layer, head)] = counts
            rows.append({"layer": layer, "head": head, "order": order, "table_size": size,
                         "tokens": head_rows.size, "distinct_ngrams": len(shared),
                         "rows_touched": int(np.count_nonzero(counts)),
                         "fraction_touched": float(np.count_nonzero(counts) / size),
                         "max_hits": int(counts.max()),
                         "ngram_collision_rate": float(shared.mean()),
                         "token_collision_rate": float(shared[inverse].mean())})
        for row in rows:
            if row["layer"] == layer:
                row["all_heads_ngram_collision_rate"] = float(in_every_head[row["order"]].mean())
    return rows, hits


def plot(hits: dict, n_head: int, path) -> None:
    from engram_jax.figures import pyplot, save_figure

    plt = pyplot()
    layers = sorted({layer for layer, _ in hits})
    fig, axes = plt.subplots(1, len(layers), figsize=(6.5 * len(layers), 4.5), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for (l, head), counts in sorted(hits.items()):
            if l != layer:
                continue
            ranked = np.sort(counts[counts > 0])[::-1]
            ax.loglog(np.arange(1, len(ranked) + 1), ranked, lw=1.2,
                      label=f"head {head} ({2 + head // n_head}-gram)")
        ax.set(xlabel="row rank", ylabel="hits", title=f"layer {layer}: hits per touched row")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> int:
    parser = probe.command_parser(__doc__, "table_usage.png")
    parser.add_argument("--sequences", type=int, default=None,
                        help="validation windows to use (default: all of them)")
    args = parser.parse_args(argv)
    try:
        checkpoint = probe.load(args.checkpoint)
        config = checkpoint.config
        if config.model.engram is None:
            raise ValueError(f"checkpoint {checkpoint.label} has no Engram layers")
        sources, _ = validation_windows(config.data, checkpoint.tokenizer)
        windows = np.concatenate([w.read(range(len(w)))[:, :-1] for _, _, w in sources])
        tokens = windows[:args.sequences or len(windows)]
    except (OSError, ValueError) as err:
        print(f"table_usage: {err}", file=sys.stderr)
        return 2
    hasher = make_hasher(config, checkpoint.tokenizer,
                         end_of_document_id(checkpoint.tokenizer, config.data.eod_token))
    rows, hits = table_usage(hasher, tokens)
    path = probe.figure_path(args.out, "table_usage.png")
    plot(hits, config.model.engram.n_head_per_ngram, path)
    for row in rows:
        print(json.dumps({"checkpoint": checkpoint.label, **row}))
    probe.write_table(path, list(rows[0]), (list(row.values()) for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
