"""Device meshes, the rules in force, sharding constraints by logical name, and global batches.

Mode: every mesh axis is `AxisType.Auto`. Parameters are placed by the logical axis rules of
`engram_jax.sharding.axes` (Flax shards them as they are created under `use_mesh`), activations
get sharding constraints at block boundaries, and the compiler (GSPMD) partitions the rest.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from engram_jax.config.schema import MESH_AXES, Config, ConfigError, ShardingConfig
from engram_jax.sharding.axes import BATCH_AXES, logical_axis_rules


def make_mesh(config: ShardingConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes `MESH_AXES`, all of type Auto. On a TPU
    torus each axis takes whole physical axes where it can, else splits one."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = config.axis_sizes(len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:  # an axis (8 of a 4x4x4 torus, say) must split a physical one
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)


def check_layout(config: Config, num_devices: int, num_processes: int) -> None:
    """Checks, before any work, that the mesh fits the devices, the global batch (and each
    gradient-accumulation micro-batch) splits evenly over processes and batch shards, and the
    routed experts split evenly over the `expert` axis and their hidden units over `tensor`.

    Raises:
      ConfigError: naming `sharding.*`, `train.batch_size`, `train.grad_accum` or `model.moe.*`.
    """
    sizes = dict(zip(MESH_AXES, config.sharding.axis_sizes(num_devices)))
    moe = config.model.moe
    if moe is not None and moe.num_routed_experts % sizes["expert"]:
        raise ConfigError(f"model.moe.num_routed_experts={moe.num_routed_experts}: must be "
                          f"divisible by sharding.expert={sizes['expert']}")
    if moe is not None and moe.expert_hidden_size % sizes["tensor"]:
        raise ConfigError(f"model.moe.expert_hidden_size={moe.expert_hidden_size}: must be "
                          f"divisible by sharding.tensor={sizes['tensor']}")
    shards = math.prod(sizes[a] for a in BATCH_AXES)
    split = " x ".join(f"{a}={sizes[a]}" for a in BATCH_AXES)
    batch, accum = config.train.batch_size, config.train.grad_accum
    if batch % num_processes:
        raise ConfigError(f"train.batch_size={batch}: must be divisible by the {num_processes} "
                          "processes")
    engram = config.model.engram
    if engram is not None and engram.table_placement == "host" and num_processes > 1:
        raise ConfigError(f"model.engram.table_placement='host' runs in one process; here are "
                          f"{num_processes} (splitting host tables by rows over processes is "
                          "not built yet): use table_placement=device")
    if batch % shards:
        raise ConfigError(f"train.batch_size={batch}: must be divisible by the {shards} batch "
                          f"shards of the mesh ({split})")
    if (batch // accum) % shards:
        raise ConfigError(f"train.grad_accum={accum}: micro-batches of {batch // accum} "
                          f"sequences do not split into the {shards} batch shards of the mesh "
                          f"({split}); make train.batch_size / train.grad_accum a multiple of "
                          f"{shards}")


def default_mesh(config: ShardingConfig) -> Mesh | None:
    """The mesh of `config` over all devices, or None when there is only one device."""
    return make_mesh(config) if jax.device_count() > 1 else None


@contextlib.contextmanager
def use_mesh(config: ShardingConfig, mesh: Mesh | None):
    """Within this context models are created sharded, and run sharded under `jax.jit`. With
    `mesh` None (one device) it does nothing."""
    if mesh is None:
        yield None
        return
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_axis_rules(config)):
        yield mesh


def mesh_axes_of(logical: str | None) -> tuple[str, ...]:
    """The mesh axes the active rules map a logical name to (empty without a mesh)."""
    if logical is None or jax.sharding.get_abstract_mesh().empty:
        return ()
    for name, axes in spmd.get_logical_axis_rules():
        if name == logical:
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)
    return ()


def logical_spec(axes: Sequence[str | None]) -> P:
    """PartitionSpec of logical axis names under the active rules."""
    return P(*[mesh_axes_of(a) or None for a in axes])


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; does nothing without an active mesh."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes))


def shard_shapes(array: jax.Array) -> list[tuple[int, ...]]:
    """Shapes of the pieces of `array` on this process's devices."""
    return [tuple(s.data.shape) for s in array.addressable_shards]


def global_batch(local: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """The global array whose batch (first) dimension is split over `BATCH_AXES`, from this
    process's consecutive part of it (`jax.make_array_from_process_local_data`); without a mesh,
    the array on the default device."""
    if mesh is None:
        return jnp.asarray(local)
    sharding = jax.sharding.NamedSharding(mesh, P(BATCH_AXES))
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))
