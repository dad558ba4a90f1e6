"""The training step and the evaluation step, and the state they act on.

`train_step` is one optimiser step (gradient accumulation over micro-batches, clipping and the
optimiser's transforms, then the MoE balancing-bias update); the loop jits it with the model and
optimiser donated. A batch is {"tokens": int (B, L + 1), "hash_ids": {layer: int32 (B, L, K)}}
and, with `data.document_mask`, "segment_ids": int32 (B, L).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from engram_jax.config.schema import Config
from engram_jax.nn.model import Transformer
from engram_jax.train.optimizer import make_optimizer


def create_train_state(config: Config) -> tuple[Transformer, nnx.Optimizer]:
    """The model (initialised from `train.seed`) and its optimiser; under `use_mesh` both are
    created sharded."""
    model = Transformer(config.model, rngs=nnx.Rngs(config.train.seed))
    return model, nnx.Optimizer(model, make_optimizer(config.train), wrt=nnx.Param)


def lm_loss(model: Transformer, tokens: jax.Array, hash_ids,
            segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy of (B, L + 1) tokens, and the Engram gate means."""
    loss = model.next_token_nll(tokens, hash_ids, segment_ids).mean()
    gates = {str(layer): module.gate_mean[...]
             for layer, module in model.engram_modules().items()}
    return loss, gates


def train_step(model: Transformer, optimizer: nnx.Optimizer, batch: dict,
               grad_accum: int) -> dict:
    """One optimiser step on `batch` split into `grad_accum` micro-batches; returns the step's
    metrics (device scalars): loss, gradient norm, MoE load, Engram gates."""
    tokens, hash_ids = batch["tokens"], batch["hash_ids"]
    segment_ids = batch.get("segment_ids")
    micro = tokens.shape[0] // grad_accum
    grads, losses, gates = None, [], []
    for i in range(grad_accum):  # unrolled: grad_accum is small
        part = slice(i * micro, (i + 1) * micro)
        (loss, gate_means), g = nnx.value_and_grad(lm_loss, has_aux=True)(
            model, tokens[part], {k: v[part] for k, v in hash_ids.items()},
            None if segment_ids is None else segment_ids[part])
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        losses.append(loss)
        gates.append(gate_means)
    if grad_accum > 1:
        grads = jax.tree.map(lambda g: g / grad_accum, grads)
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    metrics = {"loss": jnp.mean(jnp.stack(losses)), "grad_norm": grad_norm}
    for layer, load in model.expert_loads().items():  # since the last bias update: this step
        metrics[f"moe_load_max_over_mean/{layer}"] = jnp.max(load) / jnp.maximum(jnp.mean(load),
                                                                               1.0)
    model.update_router_biases()
    for layer in gates[0]:
        mean = jnp.mean(jnp.stack([g[layer] for g in gates]), axis=0)
        for branch in range(mean.shape[0]):
            metrics[f"engram_gate/{layer}/{branch}"] = mean[branch]
    return metrics


# The trainer's compiled step: jitted_train_step(model, optimizer, batch, grad_accum), the model
# and optimiser donated (updated in place). `engram_jax.aot` compiles this same object.
jitted_train_step = nnx.jit(train_step, static_argnums=(3,), donate_argnums=(0, 1))


@jax.jit(static_argnums=0)
def eval_sums(graphdef, state, batch, byte_lengths) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed NLL, token count, text bytes) of a batch's targets; `byte_lengths` int32 (V,)
    gives each token's bytes. The model's state is left untouched."""
    model = nnx.merge(graphdef, state)
    tokens = batch["tokens"]
    nll = model.next_token_nll(tokens, batch["hash_ids"], batch.get("segment_ids"))
    return (jnp.sum(nll), jnp.asarray(nll.size, jnp.float32),
            jnp.sum(byte_lengths[tokens[:, 1:]]))
