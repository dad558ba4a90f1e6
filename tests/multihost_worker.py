"""One process of the two-process tests, on four CPU devices of its own.

Usage: python multihost_worker.py train PROCESS_ID NUM_PROCESSES PORT STEPS
         trains `tiny` for STEPS steps on its half of each batch; prints
         {"process": i, "devices": n, "losses": [...]}
       python multihost_worker.py lookup PROCESS_ID NUM_PROCESSES PORT
         runs the all-to-all Engram lookup over all devices of both processes; prints, per id
         batch, the largest differences from one device's output and table gradient.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from engram_jax.config import ShardingConfig  # noqa: E402
from engram_jax.sharding import (BATCH_AXES, MESH_AXES, exchange_lookup,  # noqa: E402
                                 global_batch, make_mesh, use_mesh)
from sharded_training import (id_batch, lookup_reference, run_steps,  # noqa: E402
                              table_and_cotangent)


def lookup_errors(process_id: int, num_processes: int) -> dict:
    sharding = ShardingConfig(data=2, fsdp=-1)
    mesh = make_mesh(sharding)
    table, cotangent = table_and_cotangent()
    lookup = lambda t, i: exchange_lookup(t, i, MESH_AXES, BATCH_AXES)
    errors = {}
    with use_mesh(sharding, mesh):
        global_table = jax.make_array_from_callback(
            table.shape, NamedSharding(mesh, P(MESH_AXES, None)), lambda index: table[index])
        for kind in ("spread", "one_shard"):
            ids = id_batch(kind)
            rows = slice(process_id * len(ids) // num_processes,
                         (process_id + 1) * len(ids) // num_processes)
            out = jax.jit(lookup)(global_table, global_batch(ids[rows], mesh))
            grad = jax.jit(jax.grad(lambda t, i: jnp.sum(lookup(t, i) * cotangent)))(
                global_table, global_batch(ids[rows], mesh))
            ref_out, ref_grad = lookup_reference(table, ids, cotangent)
            out = multihost_utils.process_allgather(out, tiled=True)
            grad = multihost_utils.process_allgather(grad, tiled=True)
            errors[kind] = {"output_max_error": float(np.max(np.abs(out - ref_out))),
                            "grad_max_error": float(np.max(np.abs(grad - ref_grad)))}
    return errors


def main():
    mode = sys.argv[1]
    process_id, num_processes, port = (int(a) for a in sys.argv[2:5])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=600)
    result = {"process": process_id, "devices": jax.device_count()}
    if mode == "train":
        result["losses"] = run_steps(int(sys.argv[5]), process_id, num_processes)
    else:
        result.update(lookup_errors(process_id, num_processes))
    print(json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
