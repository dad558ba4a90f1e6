"""How the model is laid out on devices.

  axes    the logical axis names every parameter and constraint uses, and the one rule table
          that maps them onto the mesh axes
  mesh    meshes, `use_mesh` (the rules in force), constraints by logical name, global batches
  lookup  reads of row-sharded Engram tables by all-to-all or routed exchanges (`jax.shard_map`)
  hlo     collectives read back from compiled programs, with their traffic
"""

from engram_jax.sharding.axes import BATCH_AXES, MESH_AXES, logical_axis_rules
from engram_jax.sharding.lookup import (exchange_lookup, routed_lookup, table_lookup,
                                        table_shards)
from engram_jax.sharding.mesh import (constrain, default_mesh, global_batch, logical_spec,
                                      make_mesh, mesh_axes_of, shard_shapes, use_mesh)

__all__ = ["BATCH_AXES", "MESH_AXES", "constrain", "default_mesh", "exchange_lookup",
           "global_batch", "logical_axis_rules", "logical_spec", "make_mesh", "mesh_axes_of",
           "routed_lookup", "shard_shapes", "table_lookup", "table_shards", "use_mesh"]
