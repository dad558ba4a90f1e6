"""Parameters annotated with logical axis names, and the initialisers they share.

Every parameter of the project is made by `logical_param`, so each carries `out_sharding` = its
logical axis names (the vocabulary of `engram_jax.sharding.axes`). Under a mesh
(`jax.set_mesh`) with logical axis rules (`nnx.logical_axis_rules`) Flax shards it as it is
created; without a mesh it is created unsharded and the names stay as metadata, read back with
`nnx.get_partition_spec`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jax.typing.DTypeLike], jax.Array]


def scaled_normal(fan_in: int) -> Initializer:
    """Normal initialiser with standard deviation 1/sqrt(fan_in)."""
    return nnx.initializers.normal(1.0 / np.sqrt(fan_in))


def logical_param(init: Initializer, key: jax.Array, shape: Sequence[int],
                  dtype: jax.typing.DTypeLike, axes: Sequence[str | None]) -> nnx.Param:
    """An `nnx.Param` initialised by `init(key, shape, dtype)` with logical axis names `axes`."""
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} axis names {tuple(axes)} for a parameter of shape {shape}")
    eager = not jax.sharding.get_abstract_mesh().empty
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(axes),
                     eager_sharding=eager)
