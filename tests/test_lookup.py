"""The all-to-all lookup of row-sharded Engram tables (`sharding.exchange_lookup`) on 8 fake CPU
devices: equal to one device's gather, forward and table gradient, on every mesh of the
sharding tests and for id batches from evenly spread to all on one shard; traffic that follows
each device's own ids; no retrace when a batch needs more rounds; two real processes."""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from engram_jax.config import ShardingConfig
from engram_jax.sharding import (BATCH_AXES, MESH_AXES, exchange_lookup, hlo, make_mesh,
                                 routed_lookup, use_mesh)
from engram_jax.sharding.mesh import mesh_axes_of
from engram_jax.sharding.axes import ENGRAM_ROWS
from processes import collect, free_port
from sharded_training import (MESHES, ROWS, WIDTH, id_batch, lookup_reference,
                              table_and_cotangent)

HERE = pathlib.Path(__file__).parent
LOOKUP_MESHES = {
    **MESHES,
    # Tables split over axes that do not split the batch, or over some batch axes only.
    "data2_fsdp4_table_fsdp": ShardingConfig(data=2, fsdp=4, engram_table_axes=("fsdp",)),
    "data4_tensor2_table_tensor": ShardingConfig(data=4, tensor=2,
                                                 engram_table_axes=("tensor",)),
}


def _on_mesh(sharding: ShardingConfig, table, ids, cotangent, capacity_factor=0.75):
    """Output and table gradient (of sum(lookup * cotangent)) of the lookup on a mesh."""
    mesh = make_mesh(sharding)
    with use_mesh(sharding, mesh):
        table_axes, batch_axes = mesh_axes_of(ENGRAM_ROWS), mesh_axes_of("batch")
        lookup = lambda t, i: exchange_lookup(t, i, table_axes, batch_axes, capacity_factor)
        table = jax.device_put(table, NamedSharding(mesh, P(table_axes, None)))
        ids = jax.device_put(ids, NamedSharding(mesh, P(batch_axes)))
        out = jax.jit(lookup)(table, ids)
        grad = jax.jit(jax.grad(lambda t, i: jnp.sum(lookup(t, i) * cotangent)))(table, ids)
        assert grad.sharding.is_equivalent_to(table.sharding, 2)  # it stays row-sharded
        return np.asarray(out), np.asarray(grad)


@pytest.mark.parametrize("kind", ["spread", "one_shard", "duplicates", "distinct"])
@pytest.mark.parametrize("name", LOOKUP_MESHES)
def test_equals_one_device(name, kind):
    table, cotangent = table_and_cotangent()
    ids = id_batch(kind)
    out, grad = _on_mesh(LOOKUP_MESHES[name], table, ids, cotangent)
    ref_out, ref_grad = lookup_reference(table, ids, cotangent)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_rounds_cover_any_skew_at_the_smallest_capacity():
    """One id slot per destination and round: each device needs as many rounds as it has
    distinct ids for the busiest owner, and still nothing is lost."""
    table, cotangent = table_and_cotangent()
    ids = id_batch("one_shard")
    out, grad = _on_mesh(MESHES["data2_fsdp4"], table, ids, cotangent, capacity_factor=1e-9)
    ref_out, ref_grad = lookup_reference(table, ids, cotangent)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_bfloat16_table_gradients_are_summed_in_float32():
    table, cotangent = table_and_cotangent()
    ids = id_batch("duplicates")  # three ids, each about 170 times
    out, grad = _on_mesh(MESHES["data2_fsdp4"], table.astype(jnp.bfloat16), ids,
                         cotangent.astype(jnp.bfloat16))
    assert grad.dtype == jnp.bfloat16
    exact = lookup_reference(table, ids, cotangent.astype(jnp.bfloat16).astype(np.float32))[1]
    # Each device's partial sums travel in bf16 (values about 13, partial sums about 5).
    np.testing.assert_allclose(grad.astype(np.float32), exact, rtol=1e-2, atol=0.1)


def test_no_retrace_when_a_batch_needs_more_rounds():
    sharding = MESHES["data2_fsdp4"]
    mesh = make_mesh(sharding)
    table, cotangent = table_and_cotangent()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(t, i):
        return jax.value_and_grad(lambda t: jnp.sum(
            exchange_lookup(t, i, MESH_AXES, BATCH_AXES) * cotangent))(t)

    # The skewed batch needs several rounds: its busiest device has more distinct ids for one
    # owner than the C = ceil(0.75 * 64 / 8) = 6 slots of a round (and than 16, at capacity 2).
    per_device = id_batch("one_shard").reshape(8, -1)
    assert max(np.bincount(np.unique(ids) // (ROWS // 8)).max() for ids in per_device) > 16
    with use_mesh(sharding, mesh):
        table = jax.device_put(table, NamedSharding(mesh, P(MESH_AXES, None)))
        for kind in ("spread", "one_shard", "duplicates", "spread"):
            ids = jax.device_put(id_batch(kind), NamedSharding(mesh, P(BATCH_AXES)))
            loss, grad = step(table, ids)
            ref_out, ref_grad = lookup_reference(np.asarray(table), id_batch(kind), cotangent)
            np.testing.assert_allclose(float(loss), np.sum(ref_out * cotangent), rtol=1e-5)
            np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-5, atol=1e-5)


def _traffic(lookup, devices: int, rows_per_device: int = 2) -> dict[str, float]:
    """Bytes per device by kind for the forward and backward of a lookup over `devices` data
    shards of `rows_per_device` sequences each (the table split over all of them)."""
    sharding = ShardingConfig(data=devices)
    mesh = make_mesh(sharding, jax.devices()[:devices])
    with use_mesh(sharding, mesh):
        table = jax.ShapeDtypeStruct((ROWS * 8, WIDTH), jnp.float32,
                                     sharding=NamedSharding(mesh, P(MESH_AXES, None)))
        ids = jax.ShapeDtypeStruct((devices * rows_per_device, 64, 4), jnp.int32,
                                   sharding=NamedSharding(mesh, P(BATCH_AXES)))
        grad = jax.grad(lambda t, i: jnp.sum(lookup(t, i) ** 2))
        text = jax.jit(grad).lower(table, ids).compile().as_text()
    return hlo.traffic_by_kind(text, devices)


def test_traffic_per_device_does_not_grow_with_the_mesh():
    exchange = lambda t, i: exchange_lookup(t, i, MESH_AXES, BATCH_AXES)
    routed = lambda t, i: routed_lookup(t, i, MESH_AXES, BATCH_AXES)
    sent = {n: _traffic(exchange, n) for n in (2, 4, 8)}
    for kinds in sent.values():
        assert kinds["all-to-all"] > 0
        assert kinds["all-gather"] == kinds["reduce-scatter"] == 0
        assert kinds["all-reduce"] < 64  # the round count agreed: one int per device
    # The same local batch on 2, 4 and 8 devices: the exchange's bytes per device stay within
    # the (n-1)/n of a ring, the routed lookup's grow with the gathered batch.
    totals = {n: sum(kinds.values()) for n, kinds in sent.items()}
    assert totals[8] <= 2 * totals[2]
    routed_totals = {n: sum(_traffic(routed, n).values()) for n in (2, 8)}
    assert routed_totals[8] > 3 * routed_totals[2]
    assert totals[8] < routed_totals[8] / 2


def test_two_processes_look_up_like_one_device():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    workers = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), "lookup",
                                 str(i), "2", str(port)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    results = [json.loads(out.strip().splitlines()[-1]) for out in collect(workers)]
    for result in results:
        assert result["devices"] == 8
        for kind in ("spread", "one_shard"):
            assert result[kind]["output_max_error"] == 0.0, result
            assert result[kind]["grad_max_error"] < 1e-5, result
