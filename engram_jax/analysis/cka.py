"""Linear CKA between the layers of two checkpoints on the same validation tokens.

  python -m engram_jax.analysis.cka --checkpoint RUN_A --checkpoint RUN_B
      [--sequences 8] [--out results/analysis/cka.png]

Representations are each layer's merged residual streams (layer 0 is the embedding), one row per
token. CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc: 1
for representations equal up to rotation and scale. The paper reads an Engram model's layer i
matching a MoE model's deeper layer j > i as Engram "adding depth". With one --checkpoint the
model is compared with itself. Writes the heatmap PNG and the matrix as CSV.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.analysis import probe


def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
    """Linear CKA of representations x (N, Dx) and y (N, Dy) of the same N examples, in
    float32; in [0, 1]."""
    x = x.astype(jnp.float32) - jnp.mean(x, axis=0, dtype=jnp.float32)
    y = y.astype(jnp.float32) - jnp.mean(y, axis=0, dtype=jnp.float32)
    cross = jnp.sum(jnp.square(y.T @ x))
    return cross / (jnp.linalg.norm(x.T @ x) * jnp.linalg.norm(y.T @ y))


@jax.jit
def cka_matrix(states_a: list[jax.Array], states_b: list[jax.Array]) -> jax.Array:
    """(len(states_a), len(states_b)) CKA of every pair of layers; states are (B, L, D)."""
    flat_a = [s.reshape(-1, s.shape[-1]) for s in states_a]
    flat_b = [s.reshape(-1, s.shape[-1]) for s in states_b]
    return jnp.stack([jnp.stack([linear_cka(a, b) for b in flat_b]) for a in flat_a])


def plot(matrix: np.ndarray, label_a: str, label_b: str, path) -> None:
    from engram_jax.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * matrix.shape[1] + 2.5, 1.0 * matrix.shape[0] + 1.8))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", origin="lower")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="white" if value < 0.6 else "black")
    ax.set(xlabel=f"{label_b} layer", ylabel=f"{label_a} layer", title="linear CKA",
           xticks=range(matrix.shape[1]), yticks=range(matrix.shape[0]))
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)


def report(path, checkpoints: list[probe.Checkpoint], tokens: np.ndarray) -> None:
    """The CKA matrix of the first checkpoint against the last: plot, JSON line and CSV."""
    a, b = checkpoints[0], checkpoints[-1]
    matrix = np.asarray(cka_matrix(probe.layer_states(a, tokens), probe.layer_states(b, tokens)))
    plot(matrix, a.label, b.label, path)
    print(json.dumps({"a": a.label, "b": b.label, "cka": matrix.round(4).tolist()}))
    probe.write_table(path, [f"{a.label} layer \\ {b.label} layer", *range(matrix.shape[1])],
                      ([i, *row] for i, row in enumerate(matrix.tolist())))


def main(argv=None) -> int:
    return probe.run_comparison(__doc__, "cka", 8, argv, report)


if __name__ == "__main__":
    sys.exit(main())
