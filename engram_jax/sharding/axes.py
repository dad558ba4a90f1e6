"""The one vocabulary of logical axis names, and the one table that maps them onto mesh axes.

Every parameter and every sharding constraint names its dimensions with the constants below;
`logical_axis_rules` is the only place that says which mesh axes split each of them. The mesh
axes themselves are `engram_jax.config.MESH_AXES` (one size field each in `ShardingConfig`):

  data    pure data parallelism
  fsdp    data parallelism with parameters split on their `embed` dimension
  expert  routed experts split across devices; it also carries batch
  tensor  attention heads, FFN hidden units and the vocabulary
"""

from __future__ import annotations

from engram_jax.config.schema import MESH_AXES, ShardingConfig

# Mesh axes that split the batch.
BATCH_AXES = ("data", "fsdp", "expert")

# Activations.
BATCH = "batch"
# The stacked axis of a run of scanned blocks (`model.scan_layers`): never split.
LAYERS = "layers"
# Backbone parameters.
EMBED = "embed"  # the model width D
VOCAB = "vocab"
Q_HEADS = "q_heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"  # dense FFN hidden units
EXPERTS = "experts"  # routed experts
EXPERT_MLP = "expert_mlp"  # an expert's hidden units
# Engram.
ENGRAM_ROWS = "engram_rows"  # table rows (all heads of a layer)
ENGRAM_COLS = "engram_cols"  # one head's row width
ENGRAM_EMBED = "engram_embed"  # the concatenated lookup of all heads, E
CONV_TAPS = "conv_taps"
# mHC.
HC_STREAMS = "hc_streams"  # the n residual streams
HC_FLAT = "hc_flat"  # n * D, the flattened streams
HC_COEFFS = "hc_coeffs"  # n * n + 2n mixing coefficients


def logical_axis_rules(config: ShardingConfig) -> tuple[tuple[str, str | tuple[str, ...] | None],
                                                        ...]:
    """Logical axis name -> the mesh axes that split it (None: replicated), for parameters and
    activations alike. Engram table rows go over `config.engram_table_axes` (default: all)."""
    return (
        (BATCH, BATCH_AXES),
        (EMBED, "fsdp"),
        (VOCAB, "tensor"),
        (Q_HEADS, "tensor"),
        (KV_HEADS, "tensor"),
        (MLP, "tensor"),
        (EXPERTS, "expert"),
        (EXPERT_MLP, "tensor"),
        (ENGRAM_ROWS, config.engram_table_axes),
        # Not split: named so that every parameter's axes resolve.
        (LAYERS, None),
        (HEAD_DIM, None),
        (ENGRAM_COLS, None),
        (ENGRAM_EMBED, None),
        (HC_STREAMS, None),
        (HC_FLAT, None),
        (HC_COEFFS, None),
        (CONV_TAPS, None),
    )


__all__ = ["MESH_AXES", "BATCH_AXES", "logical_axis_rules"]
