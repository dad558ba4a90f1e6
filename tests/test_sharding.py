"""Sharding on 8 fake CPU devices: equal results on every mesh, row-split tables, the routed
lookup's communication, and two real processes."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from engram_jax.config import ConfigError, ShardingConfig
from engram_jax.nn.model import Transformer
from engram_jax.sharding import (MESH_AXES, global_batch, hlo, make_mesh, routed_lookup,
                                 shard_shapes, use_mesh)
from engram_jax.train.step import lm_loss
from processes import collect, free_port
from sharded_training import MESHES, TINY, batch, jitted_step, run_steps

HERE = pathlib.Path(__file__).parent

grad_step = nnx.jit(nnx.value_and_grad(lm_loss, has_aux=True))


def _arrays(state) -> dict:
    """path -> numpy array (metadata such as eager sharding differs between layouts)."""
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def _assert_close(state, ref_arrays):
    arrays = _arrays(state)
    assert arrays.keys() == ref_arrays.keys()
    for path, ref in ref_arrays.items():
        np.testing.assert_allclose(arrays[path], ref, atol=2e-6, rtol=1e-4, err_msg=str(path))


@pytest.fixture(scope="module")
def reference():
    """Loss and gradients of one step on one device."""
    tokens, hash_ids = batch(0)
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    (loss, _), grads = grad_step(model, jnp.asarray(tokens),
                                 {k: jnp.asarray(v) for k, v in hash_ids.items()})
    return float(loss), _arrays(nnx.state(grads)), _arrays(nnx.state(model, nnx.Param))


def _sharded_step(sharding, config=TINY):
    tokens, hash_ids = batch(0)
    mesh = make_mesh(sharding)
    with use_mesh(sharding, mesh):
        model = Transformer(config, rngs=nnx.Rngs(0))
        (loss, _), grads = grad_step(model, global_batch(tokens, mesh),
                                     {k: global_batch(v, mesh) for k, v in hash_ids.items()})
    return model, float(loss), nnx.state(grads)


@pytest.mark.parametrize("name", MESHES)
def test_step_equals_single_device(name, reference):
    ref_loss, ref_grads, ref_params = reference
    model, loss, grads = _sharded_step(MESHES[name])
    # Same initial parameters, whatever the layout.
    params = _arrays(nnx.state(model, nnx.Param))
    for path, ref in ref_params.items():
        np.testing.assert_array_equal(params[path], ref, err_msg=str(path))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    _assert_close(grads, ref_grads)
    table = model.blocks[1].engram.table[...]
    devices = np.prod(MESHES[name].axis_sizes(8))
    # No device holds the whole table: each has rows / 8, and its gradient stays split too.
    assert shard_shapes(table) == [(table.shape[0] // devices, table.shape[1])] * devices
    table_grad = grads["blocks"][1]["engram"]["table"][...]
    assert shard_shapes(table_grad) == shard_shapes(table)


def _sgd_step(sharding: ShardingConfig | None, grad_accum: int) -> dict:
    """Parameters after one trainer step (SGD at rate 1, so the change is the gradient) on a
    batch of 16, on one device or on a mesh."""
    tokens, hash_ids = batch(0, rows=16)
    mesh = make_mesh(sharding) if sharding is not None else None
    with use_mesh(sharding, mesh):
        model = Transformer(TINY, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
        jitted_step(model, optimizer, {"tokens": global_batch(tokens, mesh), "hash_ids": {
            k: global_batch(v, mesh) for k, v in hash_ids.items()}}, grad_accum)
    return _arrays(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def one_large_batch():
    return _sgd_step(None, grad_accum=1)


@pytest.mark.parametrize("name", MESHES)
def test_gradient_accumulation_on_a_mesh_equals_one_large_batch(name, one_large_batch):
    accumulated = _sgd_step(MESHES[name], grad_accum=2)
    for path, ref in one_large_batch.items():
        np.testing.assert_allclose(accumulated[path], ref, atol=1e-5, rtol=1e-4,
                                   err_msg=str(path))


@pytest.mark.parametrize("lookup", ["routed", "auto"])
def test_other_lookups_give_the_same_step(lookup, reference):
    config = dataclasses.replace(TINY, engram=dataclasses.replace(TINY.engram, lookup=lookup))
    _, loss, grads = _sharded_step(MESHES["data2_fsdp2_tensor2"], config)
    np.testing.assert_allclose(loss, reference[0], rtol=1e-6)
    _assert_close(grads, reference[1])


def _lookup_hlo(lookup, rows, width, batch_size, length, heads):
    sharding = ShardingConfig(data=2, fsdp=4)
    mesh = make_mesh(sharding)
    table_spec = jax.sharding.PartitionSpec(MESH_AXES, None)
    batch_spec = jax.sharding.PartitionSpec(("data", "fsdp", "expert"))
    with use_mesh(sharding, mesh):
        table = jax.ShapeDtypeStruct((rows, width), jnp.float32,
                                     sharding=jax.NamedSharding(mesh, table_spec))
        ids = jax.ShapeDtypeStruct((batch_size, length, heads), jnp.int32,
                                   sharding=jax.NamedSharding(mesh, batch_spec))
        grad = jax.grad(lambda t, i: jnp.sum(lookup(t, i) ** 2))
        return jax.jit(grad).lower(table, ids).compile().as_text()


def test_routed_lookup_has_no_all_reduce_of_the_output():
    shape = dict(rows=4096, width=16, batch_size=16, length=32, heads=4)
    output_bytes = 16 * 32 * 4 * 16 * 4
    routed = hlo.collectives(_lookup_hlo(
        lambda t, i: routed_lookup(t, i, MESH_AXES, ("data", "fsdp", "expert")), **shape))
    auto = hlo.collectives(_lookup_hlo(lambda t, i: jnp.take(t, i, axis=0), **shape))
    full_all_reduces = lambda ops: [op for op in ops
                                    if op.kind == "all-reduce" and op.bytes >= output_bytes]
    assert full_all_reduces(auto), "the check must see the automatic gather's all-reduce"
    assert not full_all_reduces(routed)
    assert {op.kind for op in routed} >= {"all-gather", "reduce-scatter"}


def test_hlo_parser():
    text = ("%ar = f32[8,4]{1,0} all-reduce(f32[8,4]{1,0} %x), replica_groups={}\n"
            "%ag = (bf16[2,2]{1,0}, s32[3]{0}) all-gather-start(%a, %b)\n"
            "%c = f32[4]{0} add(%x, %y)\n")
    ops = hlo.collectives(text)
    assert [(op.kind, op.bytes) for op in ops] == [("all-reduce", 128), ("all-gather", 20)]
    assert hlo.traffic_by_kind(text, num_devices=4)["all-reduce"] == 2 * 3 / 4 * 128
    grouped = ("%r = f32[2]{0} reduce-scatter(%x), replica_groups={{0,1},{2,3}}\n"
               "%s = f32[2]{0} all-reduce(%x), replica_groups={{0},{1},{2},{3}}\n"
               "%t = f32[2]{0} all-gather(%x), replica_groups=mesh['a'=2,'b'=4] {'b'}\n")
    assert [op.group_size for op in hlo.collectives(grouped)] == [2, 1, 4]
    # TPU programs write a reduce-scatter as an all-reduce and a slice in a computation of its
    # own: counted as the reduce-scatter, at the slice's size.
    tpu = ("%all-reduce-scatter.7 (input.7: f32[8,6]) -> f32[2,6] {\n"
           "  %all-reduce.1 = f32[8,6]{1,0} all-reduce(%input.7), replica_groups={{0,1,2,3}}\n"
           "  ROOT %ds = f32[2,6]{1,0} dynamic-slice(%all-reduce.1, %i, %j)\n"
           "}\n"
           "%ar = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={{0,1,2,3}}\n")
    assert [(op.kind, op.bytes) for op in hlo.collectives(tpu)] == [("reduce-scatter", 48),
                                                                      ("all-reduce", 32)]
    assert hlo.traffic_by_kind(grouped, num_devices=8) == {
        "all-reduce": 0.0, "all-gather": 3 / 4 * 8, "reduce-scatter": 8.0, "all-to-all": 0.0,
        "collective-permute": 0.0}
    # Tuples of six or more arrays are printed with /*index=N*/ comments.
    tuple_of_six = ("%a2a = (s32[1,2]{1,0}, s32[1,2]{1,0}, s32[1,2]{1,0}, s32[1,2]{1,0}, "
                    "s32[1,2]{1,0}, /*index=5*/s32[1,2]{1,0}) all-to-all(%a, %b, %c, %d, %e, %f)"
                    ", replica_groups={{0,1,2,3,4,5}}\n")
    assert [(op.kind, op.bytes) for op in hlo.collectives(tuple_of_six)] == [("all-to-all", 48)]


def test_hlo_collectives_in_a_scan_count_once_per_iteration():
    """A layer scanned 5 times whose body all-gathers its fsdp-split weight: 5 all-gathers."""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    weights = jax.device_put(jnp.ones((5, 64, 16)), NamedSharding(mesh, P(None, "fsdp")))
    x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("fsdp")))

    def layers(x, weights):
        def step(x, w):
            w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))
            return jnp.tanh(x @ w.T @ w), None
        return jax.lax.scan(step, x, weights)[0]

    text = jax.jit(layers).lower(x, weights).compile().as_text()
    gathers = [op for op in hlo.collectives(text) if op.kind == "all-gather"]
    assert gathers and {op.runs for op in gathers} == {5}
    per_run = sum(op.traffic(8) for op in gathers)
    assert hlo.traffic_by_kind(text, 8)["all-gather"] == 5 * per_run


def test_mesh_config_errors():
    assert ShardingConfig(fsdp=2).axis_sizes(8) == (4, 2, 1, 1)
    with pytest.raises(ConfigError, match="cannot be split"):
        ShardingConfig(fsdp=3).axis_sizes(8)
    with pytest.raises(ConfigError, match="use 4 devices, but 8"):
        ShardingConfig(data=2, fsdp=2).axis_sizes(8)
    with pytest.raises(ConfigError, match="at most one may be -1"):
        ShardingConfig(data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match="unknown axis 'model'"):
        ShardingConfig(engram_table_axes=("model",))


def test_table_rows_must_split_evenly():
    config = dataclasses.replace(TINY, engram=dataclasses.replace(TINY.engram,
                                                                  table_row_multiple=4))
    rows = Transformer(config, rngs=nnx.Rngs(0)).blocks[1].engram.table.shape[0]
    assert rows % 8  # 420 rows: no 8 equal shards
    sharding = ShardingConfig(data=8)
    with use_mesh(sharding, make_mesh(sharding)):
        with pytest.raises(ConfigError, match="engram.table_row_multiple a multiple of 8"):
            Transformer(config, rngs=nnx.Rngs(0))


def test_two_processes_train_like_one():
    steps, port = 3, free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    workers = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), "train",
                                 str(i), "2", str(port), str(steps)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    results = [json.loads(out.strip().splitlines()[-1]) for out in collect(workers)]
    assert [r["devices"] for r in results] == [8, 8]
    assert results[0]["losses"] == results[1]["losses"]
    np.testing.assert_allclose(results[0]["losses"], run_steps(steps), rtol=1e-5)
