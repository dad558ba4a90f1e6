"""The row-sparse table optimiser (`train.table_optimizer: sparse_adam`): duplicate rows summed,
lazy Adam on the touched rows, the same first step as dense Adam and then a difference in the
untouched rows only, no table-sized gradient, and its state checkpointed."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.config import Config, ConfigError, TrainConfig, load_model_config
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.data.hashing import NgramHasher
from engram_jax.sharding import global_batch, make_mesh, shard_shapes, use_mesh
from engram_jax.train.checkpoint import Checkpointer
from engram_jax.train.sparse_adam import (SparseTableOptimizer, lazy_adam_masked, lazy_adam_rows,
                                         unique_row_sums)
from engram_jax.train.step import create_train_state, jitted_train_step, train_step
import sharded_training

TINY = load_model_config(pathlib.Path(__file__).parent.parent / "configs" / "tiny.yaml")
# Four blocks: block 0, then one scanned run of 1-3 with Engram in block 1.
SCANNED = dataclasses.replace(TINY, num_layers=4)
TRAIN = TrainConfig(warmup_steps=0, schedule="constant", learning_rate=1e-2)


def _batch(config, seed, batch=4, length=16):
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length + 1))
    hasher = NgramHasher(config.engram, CompressedTokenizer.identity(config.vocab_size))
    return {"tokens": jnp.asarray(tokens, jnp.int32),
            "hash_ids": {k: jnp.asarray(v) for k, v in hasher(tokens[:, :-1]).items()}}


def _params(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _row_ids(model, batch) -> dict[int, np.ndarray]:
    """Layer -> the table rows a batch touches."""
    return {layer: np.unique(np.asarray(batch["hash_ids"][layer]) + engram.layout.offsets)
            for layer, engram in model.engram_modules().items()}


def test_an_unknown_table_optimizer_is_named():
    with pytest.raises(ConfigError, match="train.table_optimizer='sgd': must be one of"):
        TrainConfig(table_optimizer="sgd")


def test_unique_row_sums_adds_repeats_and_pads_with_no_row():
    ids = jnp.asarray([3, 1, 3, 3, 0], jnp.int32)
    grads = jnp.arange(10, dtype=jnp.float32).reshape(5, 2)
    rows, sums = unique_row_sums(ids, grads, num_rows=4)
    np.testing.assert_array_equal(rows, [0, 1, 3, 4, 4])
    np.testing.assert_allclose(sums, [[8, 9], [2, 3], [0 + 4 + 6, 1 + 5 + 7], [0, 0], [0, 0]])


def test_lazy_adam_rows_follows_the_reference_and_leaves_other_rows():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(6, 3)).astype(np.float32)
    mu, nu = np.zeros_like(table), np.zeros_like(table)
    expected = [table.copy(), mu.copy(), nu.copy()]
    b1, b2, eps, lr = 0.9, 0.95, 1e-8, 0.1
    state = (jnp.asarray(table), jnp.asarray(mu), jnp.asarray(nu))
    for t, rows in ((1, [0, 2, 6, 6]), (2, [2, 5, 6, 6])):  # 6: filler, no row
        grads = rng.normal(size=(4, 3)).astype(np.float32)
        state = lazy_adam_rows(*state, jnp.asarray(rows, jnp.int32), jnp.asarray(grads),
                               jnp.asarray(t), jnp.asarray(lr), b1=b1, b2=b2, eps=eps)
        w, m, v = expected
        for row, g in zip(rows, grads):
            if row < 6:
                m[row] = b1 * m[row] + (1 - b1) * g
                v[row] = b2 * v[row] + (1 - b2) * g * g
                w[row] -= lr * (m[row] / (1 - b1**t)) / (np.sqrt(v[row] / (1 - b2**t)) + eps)
    for got, want in zip(state, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(state[0])[[1, 3, 4]], table[[1, 3, 4]])  # untouched


def test_the_masked_form_equals_the_row_form():
    """`lazy_adam_masked` (a table split over devices) on the scattered row sums gives what
    `lazy_adam_rows` gives."""
    rng = np.random.default_rng(2)
    state = tuple(jnp.asarray(rng.normal(size=(8, 3)), jnp.float32) for _ in range(2))
    state = (state[0], state[1], jnp.abs(state[1]))
    ids = jnp.asarray([5, 1, 5, 7], jnp.int32)
    rows, sums = unique_row_sums(ids, jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), 8)
    dense = jnp.zeros((8, 3), jnp.float32).at[rows].add(sums, mode="drop")
    touched = jnp.zeros((8,), bool).at[ids].set(True)
    hyper = dict(b1=0.9, b2=0.95, eps=1e-8)
    by_rows = lazy_adam_rows(*state, rows, sums, jnp.asarray(3), jnp.asarray(0.1), **hyper)
    masked = lazy_adam_masked(*state, touched, dense, jnp.asarray(3), jnp.asarray(0.1), **hyper)
    for a, b in zip(by_rows, masked):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scan_layers, grad_accum", [(True, 1), (False, 2)])
def test_sparse_adam_takes_dense_adams_first_step_then_differs_in_untouched_rows(
        scan_layers, grad_accum):
    """Step 1: every parameter as dense Adam's (untouched rows have zero moments). Step 2:
    still every parameter but the table rows step 1 touched and step 2 did not, which dense
    Adam moves by their momentum and lazy Adam leaves."""
    config = dataclasses.replace(SCANNED, scan_layers=scan_layers)
    after = {}
    for name in ("adam", "sparse_adam"):
        model, optimizer = create_train_state(Config(model=config, train=dataclasses.replace(
            TRAIN, table_optimizer=name, grad_accum=grad_accum)))
        assert isinstance(optimizer, SparseTableOptimizer) == (name == "sparse_adam")
        steps = []
        for seed in (0, 1):
            metrics = jitted_train_step(model, optimizer, _batch(config, seed), grad_accum)
            steps.append((_params(model), float(metrics["loss"]), float(metrics["grad_norm"])))
        after[name] = steps
        touched = [_row_ids(model, _batch(config, seed)) for seed in (0, 1)]
    (dense1, loss1, norm1), (dense2, loss2, norm2) = after["adam"]
    (sparse1, *first), (sparse2, *second) = after["sparse_adam"]
    np.testing.assert_allclose(first, [loss1, norm1], rtol=1e-6)
    np.testing.assert_allclose(second, [loss2, norm2], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 sparse1, dense1)

    # Step 2 divides by sqrt(nu) of gradients near zero, which amplifies float32 rounding (on
    # one x86 host, up to 5e-5 in a parameter): a tenth of a step (the learning rate, 1e-2)
    # still tells an update that differs from one that does not.
    def compare(path, a, b):
        if path[-1].key != "table":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
    jax.tree_util.tree_map_with_path(compare, sparse2, dense2)
    (layer, rows_1), = touched[0].items()
    only_first = np.setdiff1d(rows_1, touched[1][layer])
    assert len(only_first) > 0
    sparse_table, dense_table = _table(sparse2), _table(dense2)
    others = np.setdiff1d(np.arange(len(dense_table)), only_first)
    np.testing.assert_allclose(sparse_table[others], dense_table[others], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sparse_table[only_first], _table(sparse1)[only_first])
    assert np.all(np.abs(dense_table[only_first] - sparse_table[only_first]).max(axis=1) > 0)


def _table(params) -> np.ndarray:
    """The one Engram table of a parameter dict."""
    (table,) = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                if path[-1].key == "table"]
    return table


def _table_shaped_primitives(table_optimizer: str) -> set[str]:
    """The primitives of the train step's program that output a float array of a table's
    shape."""
    config = Config(model=SCANNED, train=dataclasses.replace(TRAIN,
                                                             table_optimizer=table_optimizer))
    model, optimizer = create_train_state(config)
    shapes = {e.table.shape for e in model.engram_modules().values()}
    graphdef, state = nnx.split((model, optimizer))
    batch = _batch(SCANNED, 0)

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        return train_step(model, optimizer, batch, 1)

    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if any(getattr(v.aval, "shape", None) in shapes and
                   jnp.issubdtype(v.aval.dtype, jnp.floating) for v in eqn.outvars):
                found.add(eqn.primitive.name)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else [param]:
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub.jaxpr)
    walk(jax.make_jaxpr(step)(state, batch).jaxpr)
    return found


def test_no_table_sized_gradient_is_built():
    # Dense Adam's step builds the table's gradient (a scatter-add, the gather's transpose)
    # and sweeps every row; the sparse step writes the touched rows of the table and its two
    # moments, and nothing else of their size.
    assert "scatter-add" in _table_shaped_primitives("adam")
    assert _table_shaped_primitives("sparse_adam") == {"scatter"}


def test_the_table_moments_are_checkpointed(tmp_path):
    config = Config(model=SCANNED, train=dataclasses.replace(TRAIN,
                                                             table_optimizer="sparse_adam"))
    model, optimizer = create_train_state(config)
    jitted_train_step(model, optimizer, _batch(SCANNED, 0), 1)
    saved = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(optimizer)))
    assert np.abs(saved["nu"]["1"]).max() > 0
    checkpointer = Checkpointer(tmp_path, asynchronous=False)
    checkpointer.save(1, model, optimizer, None, {})
    checkpointer.close()
    model, optimizer = create_train_state(config)
    Checkpointer(tmp_path).restore(model, optimizer)
    restored = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(optimizer)))
    jax.tree.map(np.testing.assert_array_equal, restored, saved)


def _sparse_step(sharding) -> tuple[float, list[np.ndarray], list]:
    """The loss of one sparse-Adam trainer step of `tiny` on a mesh (or one device), the table
    and its two moments after it, and their shard shapes."""
    config = Config(model=sharded_training.TINY,
                    train=dataclasses.replace(TRAIN, table_optimizer="sparse_adam"))
    mesh = make_mesh(sharding) if sharding is not None else None
    with use_mesh(sharding, mesh):
        model, optimizer = create_train_state(config)
        tokens, hash_ids = sharded_training.batch(0)
        metrics = jitted_train_step(model, optimizer, {
            "tokens": global_batch(tokens, mesh),
            "hash_ids": {k: global_batch(v, mesh) for k, v in hash_ids.items()}}, 1)
    arrays = [model.blocks[1].engram.table[...], optimizer.mu["1"][...], optimizer.nu["1"][...]]
    return (float(metrics["loss"]), [np.asarray(a) for a in arrays],
            [shard_shapes(a) for a in arrays])


def test_sparse_adam_on_a_mesh_equals_one_device():
    """The table split over 8 devices, the batch over 8: the same rows, moments and values.
    (Only the table's part is compared: Adam's first step, g / (|g| + 1e-8), turns the float
    noise of gradients near zero, such as the mHC biases' 1e-9, into differences of up to 3e-4
    in those parameters between this step's one-device and mesh programs.)"""
    loss, arrays, _ = _sparse_step(None)
    mesh_loss, mesh_arrays, shards = _sparse_step(sharded_training.MESHES["data2_fsdp4"])
    np.testing.assert_allclose(mesh_loss, loss, rtol=1e-6)
    for got, want in zip(mesh_arrays, arrays):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    rows, width = arrays[0].shape
    assert shards == [[(rows // 8, width)] * 8] * 3
