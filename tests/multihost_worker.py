"""One process of the two-process test: trains `tiny` for a few steps on its half of a batch.

Usage: python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT STEPS
Prints one JSON line: {"process": i, "devices": n, "losses": [...]}.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from sharded_training import run_steps  # noqa: E402


def main():
    process_id, num_processes, port, steps = (int(a) for a in sys.argv[1:5])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=600)
    losses = run_steps(steps, process_id, num_processes)
    print(json.dumps({"process": process_id, "devices": jax.device_count(), "losses": losses}),
          flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
