"""Logit lens: how far each layer's early-exit prediction is from the model's final one.

  python -m engram_jax.analysis.logit_lens --checkpoint RUN_A [--checkpoint RUN_B]
      [--sequences 16] [--out results/analysis/logit_lens.png]

Each layer's merged streams go through the final norm and LM head; the curve is the mean over
validation tokens of KL(final || layer) in nats, layer 0 being the embedding. A model whose
early layers already predict well (the paper's reading of Engram) has a curve that falls
sooner. Prints one JSON line per checkpoint and writes the PNG and a CSV beside it.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from engram_jax.analysis import probe
from engram_jax.nn.model import Transformer


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """Mean over all leading positions of KL(softmax(p) || softmax(q)), logits (..., V)."""
    log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


@nnx.jit
def layer_kl(model: Transformer, states: list[jax.Array]) -> jax.Array:
    """(num_layers + 1,) KL(final || early exit) of merged states [(B, L, D), ...]; the last
    entry compares the final layer with itself and is 0."""
    final = model.head_logits(states[-1])
    return jnp.stack([kl_divergence(final, model.head_logits(h)) for h in states])


def lens_curve(checkpoint: probe.Checkpoint, tokens) -> list[float]:
    """Per-layer KL(final || early exit) of one checkpoint on int tokens (B, L)."""
    return [float(v) for v in layer_kl(checkpoint.model, probe.layer_states(checkpoint, tokens))]


def plot(curves: list[tuple[str, list[float]]], path) -> None:
    from engram_jax.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in curves:
        ax.plot(range(len(values)), values, "o-", label=label)
    ax.set(xlabel="layer (0 = embedding)", ylabel="KL(final || early exit), nats/token",
           title="logit lens", yscale="symlog")
    ax.set_xticks(range(max(len(v) for _, v in curves)))
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def report(path, checkpoints: list[probe.Checkpoint], tokens) -> None:
    """Each checkpoint's curve: a JSON line each, one plot, one CSV."""
    curves = []
    for checkpoint in checkpoints:
        curves.append((checkpoint.label, lens_curve(checkpoint, tokens)))
        print(json.dumps({"checkpoint": checkpoint.label, "step": checkpoint.step,
                          "kl_per_layer": curves[-1][1]}))
    plot(curves, path)
    probe.write_table(path, ["checkpoint", "layer", "kl_final_vs_layer"],
                      ([label, i, v] for label, values in curves for i, v in enumerate(values)))


def main(argv=None) -> int:
    return probe.run_comparison(__doc__, "logit_lens", 16, argv, report)


if __name__ == "__main__":
    sys.exit(main())
