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
from engram_jax.train.optimizer import ADAM_EPS, make_optimizer, table_learning_rate_schedule
from engram_jax.train.sparse_adam import SparseTableOptimizer, dense_params


def create_train_state(config: Config) -> tuple[Transformer, nnx.Optimizer]:
    """The model (initialised from `train.seed`) and its optimiser (a `SparseTableOptimizer`
    with `train.table_optimizer: sparse_adam` and Engram layers); under `use_mesh` both are
    created sharded."""
    train = config.train
    model = Transformer(config.model, rngs=nnx.Rngs(train.seed))
    if train.table_optimizer == "sparse_adam" and model.engram_modules():
        return model, SparseTableOptimizer(
            model, make_optimizer(train, clip=False), table_learning_rate_schedule(train),
            b1=train.b1, b2=train.b2, eps=ADAM_EPS, clip_norm=train.clip_norm)
    return model, nnx.Optimizer(model, make_optimizer(train), wrt=nnx.Param)


def lm_loss(model: Transformer, tokens: jax.Array, hash_ids,
            segment_ids: jax.Array | None = None, rows=None) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy of (B, L + 1) tokens, and the Engram gate means; `rows`
    as `Transformer.next_token_nll`."""
    loss = model.next_token_nll(tokens, hash_ids, segment_ids, rows).mean()
    gates = {str(layer): module.gate_mean[...]
             for layer, module in model.engram_modules().items()}
    return loss, gates


def train_step(model: Transformer, optimizer: nnx.Optimizer, batch: dict,
               grad_accum: int) -> dict:
    """One optimiser step on `batch` split into `grad_accum` micro-batches; returns the step's
    metrics (device scalars): loss, gradient norm, MoE load, Engram gates. With host-resident
    tables the batch carries their rows ("rows": {layer: (B, L, E)}) and the metrics their
    step ("host_table_step", `SparseTableOptimizer.update`), which the host applies."""
    tokens, hash_ids = batch["tokens"], batch["hash_ids"]
    segment_ids = batch.get("segment_ids")
    sparse = isinstance(optimizer, SparseTableOptimizer)
    micro = tokens.shape[0] // grad_accum
    grads, row_grads, losses, gates = None, [], [], []
    for i in range(grad_accum):  # unrolled: grad_accum is small
        part = slice(i * micro, (i + 1) * micro)
        ids = {k: v[part] for k, v in hash_ids.items()}
        segments = None if segment_ids is None else segment_ids[part]
        if sparse:  # the rows' gradient, not the tables'
            wrt = (nnx.DiffState(0, dense_params), 4)
            (loss, gate_means), (g, g_rows) = nnx.value_and_grad(
                lm_loss, argnums=wrt, has_aux=True)(
                model, tokens[part], ids, segments,
                {k: v[part] for k, v in batch["rows"].items()} if "rows" in batch
                else optimizer.gather_rows(model, ids))
            row_grads.append(g_rows)
        else:
            (loss, gate_means), g = nnx.value_and_grad(lm_loss, has_aux=True)(
                model, tokens[part], ids, segments)
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        losses.append(loss)
        gates.append(gate_means)
    if grad_accum > 1:
        grads = jax.tree.map(lambda g: g / grad_accum, grads)
    if sparse:
        rows = {layer: jnp.concatenate([g[layer] for g in row_grads]) / grad_accum
                for layer in row_grads[0]}
        grad_norm, table_step = optimizer.update(model, grads, hash_ids=hash_ids, row_grads=rows)
    else:
        grad_norm = optax.tree.norm(grads)
        optimizer.update(model, grads)
    metrics = {"loss": jnp.mean(jnp.stack(losses)), "grad_norm": grad_norm}
    if sparse and table_step:
        metrics["host_table_step"] = table_step
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
    nll = model.next_token_nll(tokens, batch["hash_ids"], batch.get("segment_ids"),
                               batch.get("rows"))
    return (jnp.sum(nll), jnp.asarray(nll.size, jnp.float32),
            jnp.sum(byte_lengths[tokens[:, 1:]]))
