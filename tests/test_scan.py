"""Scanned runs of blocks (`model.scan_layers`): the same model as the loop over blocks, a
program whose size does not grow with depth, and checkpoints of the other layout refused."""

import dataclasses
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from engram_jax.config import load_model_config
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.data.hashing import NgramHasher
from engram_jax.nn.model import BlockStack, Transformer, block_runs, stack_blocks
from engram_jax.train.checkpoint import Checkpointer, CheckpointMismatch

TINY = load_model_config(pathlib.Path(__file__).parent.parent / "configs" / "tiny.yaml")
# Layers 0-1 dense, 2-5 MoE, Engram in 1 and 4: runs [0, 1] and [2, 3, 4, 5], each with one
# Engram layer under the scanned body's switch. Full remat, so the remat inside the scan is
# what runs.
DEEP = dataclasses.replace(
    TINY, num_layers=6, remat="full",
    moe=dataclasses.replace(TINY.moe, first_dense_layers=2),
    engram=dataclasses.replace(TINY.engram, layer_ids=(1, 4)))
B, L = 2, 16


def _inputs(config, seed=0):
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, size=(B, L + 1))
    hasher = NgramHasher(config.engram, CompressedTokenizer.identity(config.vocab_size))
    return jnp.asarray(tokens), {k: jnp.asarray(v) for k, v in hasher(tokens[:, :-1]).items()}


def _loss(model, tokens, hash_ids):
    logits = model(tokens[:, :-1], hash_ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _scanned_copy(unscanned: Transformer) -> Transformer:
    """The scanned model holding `unscanned`'s values (converted by `stack_blocks`)."""
    config = dataclasses.replace(unscanned.config, scan_layers=True)
    scanned = Transformer(config, rngs=nnx.Rngs(1))
    values = nnx.to_pure_dict(nnx.state(unscanned))
    values["blocks"] = stack_blocks(config, values["blocks"])
    state = nnx.state(scanned)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(scanned, state)
    return scanned


def test_block_runs():
    assert block_runs(DEEP) == [(0, 2), (2, 4)]
    assert block_runs(dataclasses.replace(DEEP, scan_layers=False)) == [(i, 1) for i in range(6)]
    paper = load_model_config(pathlib.Path(__file__).parent.parent / "configs" /
                              "paper_engram27b.yaml")
    assert block_runs(paper) == [(0, 1), (1, 29)]  # Engram in 1 and 14, inside the MoE run
    model = nnx.eval_shape(lambda: Transformer(DEEP, rngs=nnx.Rngs(0)))
    assert [type(b).__name__ for b in model.blocks] == ["BlockStack", "BlockStack"]
    assert [b.engram_layers for b in model.blocks] == [[1], [4]]
    assert list(model.engram_modules()) == [1, 4]
    chex.assert_shape(model.blocks[1].layers.attn.wq, (4, DEEP.hidden_size, DEEP.num_heads,
                                                       DEEP.attention_head_dim))
    chex.assert_trees_all_equal(model.blocks[1].slots(), jnp.asarray([0, 0, 1, 0]))
    # Tables differ in size per layer, so they are never stacked.
    assert model.blocks[1].engram["4"].table.ndim == 2
    spec = nnx.get_partition_spec(nnx.state(model, nnx.Param))["blocks"][1]
    assert tuple(spec["layers"]["ffn"]["w_gate"].get_value()) == (
        "layers", "experts", "embed", "expert_mlp")
    assert tuple(spec["engram"]["4"]["table"].get_value()) == ("engram_rows", "engram_cols")


@pytest.mark.parametrize("fusion", ["per_branch", "single"])
def test_scanned_equals_unscanned_loss_gradients_and_balancing(fusion):
    config = dataclasses.replace(DEEP, engram=dataclasses.replace(DEEP.engram, fusion=fusion))
    unscanned = Transformer(dataclasses.replace(config, scan_layers=False), rngs=nnx.Rngs(0))
    scanned = _scanned_copy(unscanned)
    tokens, hash_ids = _inputs(DEEP)
    value_and_grad = nnx.jit(lambda m, t, h: nnx.value_and_grad(_loss)(m, t, h))
    loss_u, grads_u = value_and_grad(unscanned, tokens, hash_ids)
    loss_s, grads_s = value_and_grad(scanned, tokens, hash_ids)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    expected = nnx.to_pure_dict(grads_u)
    expected["blocks"] = stack_blocks(config, expected["blocks"])
    chex.assert_trees_all_close(nnx.to_pure_dict(grads_s), expected, rtol=1e-5, atol=1e-7)
    gate_means = lambda m: {k: v.gate_mean[...] for k, v in m.engram_modules().items()}
    chex.assert_trees_all_close(gate_means(scanned), gate_means(unscanned), rtol=1e-6)
    # Each stacked MoE layer counts its own load and balances on it alone.
    loads_u, loads_s = unscanned.expert_loads(), scanned.expert_loads()
    assert list(loads_s) == [2, 3, 4, 5]
    chex.assert_trees_all_equal(loads_s, loads_u)
    unscanned.update_router_biases()
    scanned.update_router_biases()
    biases = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Variable))
    stacked = biases(unscanned)
    stacked["blocks"] = stack_blocks(config, stacked["blocks"])
    chex.assert_trees_all_close(biases(scanned), stacked)
    states_u = nnx.jit(lambda m, t, h: m.hidden_states(t, h))(unscanned, tokens[:, :-1], hash_ids)
    states_s = nnx.jit(lambda m, t, h: m.hidden_states(t, h))(scanned, tokens[:, :-1], hash_ids)
    assert len(states_s) == DEEP.num_layers + 1
    chex.assert_trees_all_close(states_s, states_u, rtol=1e-5, atol=1e-5)
    gates = nnx.jit(lambda m, s, h: m.engram_gates(s, h))
    chex.assert_trees_all_close(gates(scanned, states_s, hash_ids),
                                gates(unscanned, states_u, hash_ids), rtol=1e-5, atol=1e-6)


def _program_lines(config) -> int:
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    tokens, hash_ids = _inputs(config)

    def loss(state):
        return _loss(nnx.merge(graphdef, state), tokens, hash_ids)

    return len(jax.jit(jax.grad(loss)).lower(state).as_text().splitlines())


def test_the_program_does_not_grow_with_depth():
    deeper = dataclasses.replace(DEEP, num_layers=12)
    assert _program_lines(deeper) == _program_lines(DEEP)
    unscanned = lambda c: dataclasses.replace(c, scan_layers=False)
    assert _program_lines(unscanned(deeper)) > 1.5 * _program_lines(unscanned(DEEP))


def test_a_checkpoint_of_the_other_layout_is_refused(tmp_path):
    unscanned = Transformer(dataclasses.replace(DEEP, scan_layers=False), rngs=nnx.Rngs(0))
    checkpointer = Checkpointer(tmp_path, asynchronous=False)
    checkpointer.save(1, unscanned, nnx.Optimizer(unscanned, optax.sgd(1.0), wrt=nnx.Param),
                      None, {})
    checkpointer.close()
    scanned = Transformer(DEEP, rngs=nnx.Rngs(0))
    assert isinstance(scanned.blocks[0], BlockStack)
    with pytest.raises(CheckpointMismatch, match="model.scan_layers"):
        Checkpointer(tmp_path).restore(scanned)


def test_a_checkpoint_stacked_in_other_runs_is_refused(tmp_path):
    # Runs [0, 1] and [2..5] saved; this model's runs are [0] and [1..5] (as a checkpoint of
    # the earlier layout, where Engram layers were blocks of their own, differs).
    saved = Transformer(DEEP, rngs=nnx.Rngs(0))
    checkpointer = Checkpointer(tmp_path, asynchronous=False)
    checkpointer.save(1, saved, nnx.Optimizer(saved, optax.sgd(1.0), wrt=nnx.Param), None, {})
    checkpointer.close()
    other = dataclasses.replace(DEEP, moe=dataclasses.replace(DEEP.moe, first_dense_layers=1))
    with pytest.raises(CheckpointMismatch, match=r"stacked in other runs \(entries \[0, 1\]"):
        Checkpointer(tmp_path).restore(Transformer(other, rngs=nnx.Rngs(0)))
