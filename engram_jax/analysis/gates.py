"""Engram gate values over the tokens of a text, per Engram layer and branch, as a heatmap.

  python -m engram_jax.analysis.gates --checkpoint RUN (--text "..." | --text-file F)
      [--max-tokens 96] [--out results/analysis/gates.png]

Without a text, the first tokens of the run's validation split are used. A gate near 1 means the
block takes the retrieved n-gram memory at that token; near 0, it ignores it. Rows are (layer,
branch): one branch per mHC stream, or one with `engram.fusion: single`. Writes the PNG and a
CSV with one row per token.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.analysis import probe
from engram_jax.nn.model import Transformer


@nnx.jit
def gate_values(model: Transformer, tokens: jax.Array, hash_ids) -> dict[int, jax.Array]:
    """Engram layer id -> float32 (B, L, branches) gates of int tokens (B, L)."""
    return model.engram_gates(model.hidden_states(tokens, hash_ids), hash_ids)


def text_gates(checkpoint: probe.Checkpoint, token_ids: np.ndarray) -> dict[int, np.ndarray]:
    """Layer id -> (L, branches) gates of one sequence of token ids (L,)."""
    engram = checkpoint.config.model.engram
    if engram is None:
        raise ValueError(f"checkpoint {checkpoint.label} has no Engram layers")
    if not engram.gated:
        raise ValueError(f"checkpoint {checkpoint.label} was trained with engram.gated=false: "
                         "its gates are all 1")
    tokens = np.asarray(token_ids, np.int32)[None]
    values = gate_values(checkpoint.model, jnp.asarray(tokens), checkpoint.hash_ids(tokens))
    return {layer: np.asarray(v[0]) for layer, v in values.items()}


def plot(gates: dict[int, np.ndarray], token_texts: list[str], title: str, path,
         per_row: int = 48) -> None:
    from engram_jax.figures import pyplot

    plt = pyplot()
    rows = [(layer, branch) for layer in sorted(gates) for branch in range(gates[layer].shape[1])]
    matrix = np.stack([gates[layer][:, branch] for layer, branch in rows])  # (rows, L)
    chunks = [range(s, min(s + per_row, len(token_texts))) for s in range(0, len(token_texts),
                                                                          per_row)]
    fig, axes = plt.subplots(len(chunks), 1, squeeze=False, layout="constrained",
                             figsize=(0.28 * per_row + 2.5, (0.32 * len(rows) + 1.6) * len(chunks)))
    for ax, chunk in zip(axes[:, 0], chunks):
        part = np.full((len(rows), per_row), np.nan)  # every row of cells equally wide
        part[:, :len(chunk)] = matrix[:, chunk.start:chunk.stop]
        image = ax.imshow(part, vmin=0, vmax=1, cmap="magma", aspect="auto")
        ax.set_yticks(range(len(rows)), [f"layer {l} branch {b}" for l, b in rows], fontsize=7)
        ax.set_xticks(range(len(chunk)), [repr(token_texts[i])[1:-1] for i in chunk],
                      rotation=90, fontsize=7, family="monospace", va="top", ha="center")
    axes[0, 0].set_title(title)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="gate", shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    parser = probe.command_parser(__doc__, "gates.png")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", help="the text to show")
    source.add_argument("--text-file", help="a UTF-8 file holding the text")
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens shown (from the start)")
    args = parser.parse_args(argv)
    try:
        checkpoint = probe.load(args.checkpoint)
        if args.text_file:
            text = pathlib.Path(args.text_file).read_text(encoding="utf-8")
        if args.text is not None or args.text_file:
            ids = checkpoint.tokenizer.encode_batch([args.text if args.text is not None
                                                     else text])[0][:args.max_tokens]
        else:
            ids = probe.validation_tokens(checkpoint, 1, args.max_tokens)[0][:args.max_tokens]
        if len(ids) == 0:
            raise ValueError("the text has no tokens")
        gates = text_gates(checkpoint, np.asarray(ids))
    except (FileNotFoundError, ValueError) as err:
        print(f"gates: {err}", file=sys.stderr)
        return 2
    texts = checkpoint.tokenizer.decode_each(ids)
    path = probe.figure_path(args.out, "gates.png")
    plot(gates, texts, f"Engram gates: {checkpoint.label} (step {checkpoint.step})", path)
    print(json.dumps({"checkpoint": checkpoint.label, "tokens": len(texts), "mean_gate": {
        str(layer): np.round(g.mean(axis=0), 4).tolist() for layer, g in gates.items()}}))
    columns = [(layer, b) for layer in sorted(gates) for b in range(gates[layer].shape[1])]
    probe.write_table(path, ["position", "token", *[f"layer{l}_branch{b}" for l, b in columns]],
                      ([i, token, *[f"{gates[l][i, b]:.4f}" for l, b in columns]]
                       for i, token in enumerate(texts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
