"""Parameter and FLOP accounting on abstract shapes (nothing is allocated), and the
iso-parameter allocation between routed experts and Engram tables (paper §3.1;
docs/ARCHITECTURE.md, "Accounting").

P_tot counts every parameter except the token embedding and the LM head; P_act those a token
uses (routed experts at top_k / num_routed, Engram tables at the K rows a token reads);
P_sparse = P_tot - P_act. An Engram table's padding rows (`engram_jax.table_layout`) are never
addressed: they are memory, not parameters, and are counted apart.
"""

from __future__ import annotations

import dataclasses
import functools

from flax import nnx

from engram_jax.config.schema import EngramConfig, ModelConfig
from engram_jax.nn.model import Transformer
from engram_jax.table_layout import table_layout

ROUTED_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model config (see the module docstring for the definitions)."""

    total: int  # P_tot
    active: int  # P_act
    embedding: int  # token embedding + LM head (excluded from total and active)
    routed_experts: int
    engram_tables: int  # rows a hash id can address
    engram_table_padding: int  # allocated rows no id addresses (in no other count)
    engram_other: int  # Engram projections, norms and conv
    flops_per_token: int  # training FLOPs per token at `seq_len`
    attention_flops_per_token: int  # the part of flops_per_token in attention scores
    layer_flops_per_token: tuple[int, ...]  # each block's part of flops_per_token (with its
    # attention; the final norm and the LM head are the rest)
    seq_len: int

    @property
    def sparse(self) -> int:
        return self.total - self.active


@functools.lru_cache(maxsize=64)
def _parameter_shapes(config: ModelConfig) -> tuple[tuple[tuple, int], ...]:
    # Unscanned, so that a path reads blocks/<layer>/...: the counts are the same either way.
    config = dataclasses.replace(config, scan_layers=False)
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return tuple((tuple(path), int(_size(variable.shape))) for path, variable in flat)


def _size(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def count_parameters(config: ModelConfig, seq_len: int = 4096) -> ParamCounts:
    """Counts the parameters of `config` from abstract shapes (`nnx.eval_shape`).

    Training FLOPs per token: 6 x the active matmul parameters (LM head included, embedding and
    table lookups excluded) plus 12 x layers x heads x head_dim x seq_len for attention; also
    split by block (`layer_flops_per_token`).
    """
    totals = dict(total=0, active=0, embedding=0, routed=0, tables=0, padding=0, engram_other=0,
                  matmul=0)
    layer_matmul = [0] * config.num_layers
    moe = config.moe
    for path, size in _parameter_shapes(config):
        if path[0] == "blocks" and path[2] == "engram" and path[3] == "table":
            layout = table_layout(config.engram)[path[1]]
            totals["padding"] += layout.padding * config.engram.head_dim
            size = layout.rows * config.engram.head_dim
        if path[0] in ("embed", "head"):
            totals["embedding"] += size
            if path[0] == "head" or config.tie_embeddings:
                totals["matmul"] += size
            continue
        totals["total"] += size
        if path[0] == "blocks" and path[2] == "engram":
            if path[3] == "table":
                totals["tables"] += size
                active = config.engram.embed_dim  # K rows of head_dim each
            else:
                totals["engram_other"] += size
                active = size
        elif (path[0] == "blocks" and path[2] == "ffn" and config.is_moe_layer(path[1])
              and path[3] in ROUTED_EXPERT_WEIGHTS):
            totals["routed"] += size
            active = size * moe.top_k // moe.num_routed_experts
        else:
            active = size
        totals["active"] += active
        if not (path[0] == "blocks" and path[2] == "engram" and path[3] == "table"):
            totals["matmul"] += active
            if path[0] == "blocks":
                layer_matmul[path[1]] += active
    layer_attention = 12 * config.num_heads * config.attention_head_dim * seq_len
    attention = config.num_layers * layer_attention
    return ParamCounts(total=totals["total"], active=totals["active"],
                       embedding=totals["embedding"], routed_experts=totals["routed"],
                       engram_tables=totals["tables"], engram_table_padding=totals["padding"],
                       engram_other=totals["engram_other"],
                       flops_per_token=6 * totals["matmul"] + attention,
                       attention_flops_per_token=attention,
                       layer_flops_per_token=tuple(6 * m + layer_attention for m in layer_matmul),
                       seq_len=seq_len)


def allocate(base: ModelConfig, rho: float, engram: EngramConfig) -> ModelConfig:
    """The config whose routed experts hold rho * P_sparse and Engram tables the rest.

    `base` is a MoE config without Engram. Routed experts become
    top_k + round(rho * (num_routed - top_k)) (so the active experts are unchanged); the Engram
    tables of `engram` (its layers, orders and heads) are sized so that P_tot equals the base's.
    rho = 1 returns the base unchanged. Engram's projections add a few active parameters; the
    counts of the result say how many.
    """
    if base.moe is None or base.engram is not None:
        raise ValueError("allocate needs a MoE base config without Engram")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho={rho} must be in [0, 1]")
    moe = base.moe
    routed = moe.top_k + round(rho * (moe.num_routed_experts - moe.top_k))
    if routed == moe.num_routed_experts:
        return base
    target = count_parameters(base).total
    smaller = dataclasses.replace(base, moe=dataclasses.replace(moe, num_routed_experts=routed))
    # Size the tables with a probe config, then solve for the rows that close the gap.
    probe = dataclasses.replace(smaller, engram=dataclasses.replace(
        engram, vocab_size_per_ngram=(2,) * (engram.max_ngram_size - 1)))
    probe_counts = count_parameters(probe)
    rows = (target - probe_counts.total + probe_counts.engram_tables) // engram.head_dim
    heads = len(engram.layer_ids) * engram.num_heads
    per_head = rows // heads
    # Primes sit a little above each start: step the start down until the total no longer
    # exceeds the base's (it then falls short by a few rows per head).
    for _ in range(8):
        if per_head < 2:
            raise ValueError(f"rho={rho} leaves too few parameters for Engram tables")
        config = dataclasses.replace(smaller, engram=dataclasses.replace(
            engram, vocab_size_per_ngram=(per_head,) * (engram.max_ngram_size - 1)))
        excess = count_parameters(config).total - target
        if excess <= 0:
            return config
        per_head -= -(-excess // (engram.head_dim * heads))
    raise ValueError(f"could not size Engram tables for rho={rho}")
