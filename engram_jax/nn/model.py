"""The decoder: token embedding, n mHC streams, blocks, stream merge, final norm, LM head.

A block is
    x <- x + Engram(x, hash_ids)                  (Engram layers only; per-stream output)
    x <- mHC_attn(x, u -> Attention(RMSNorm(u)))
    x <- mHC_ffn(x,  u -> FFN or MoE(RMSNorm(u)))
with x of shape (B, L, n, D). With `engram.fusion: single` (an ablation) Engram instead reads
and adds to the attention input u: u <- u + Engram(u, hash_ids).
Hash ids come precomputed from the host (`NgramHasher`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engram_jax.config.schema import REMAT_POLICIES, ModelConfig
from engram_jax.nn.attention import Attention
from engram_jax.nn.engram import Engram
from engram_jax.nn.ffn import SwiGLU
from engram_jax.nn.mhc import MHC, StreamMerge, expand_streams
from engram_jax.nn.moe import MoE
from engram_jax.nn.normalization import RMSNorm
from engram_jax.nn.params import logical_param, scaled_normal
from engram_jax.sharding.axes import BATCH, EMBED, VOCAB
from engram_jax.sharding.mesh import constrain

STREAMS_AXES = (BATCH, None, None, None)  # activations (B, L, n, D): split the batch only

HashIds = Mapping[int, jax.Array]


class Block(nnx.Module):
    """One decoder block (see the module docstring)."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, n = config.hidden_size, config.hc_mult
        self.layer = layer
        engram = config.engram
        has_engram = engram is not None and layer in engram.layer_ids
        branches = n if has_engram and engram.fusion == "per_branch" else 1
        self.engram = Engram(engram, layer, d, branches, **kw) if has_engram else None
        self.attn_norm = RMSNorm(d, config.norm_eps, **kw)
        self.attn = Attention(d, config.num_heads, config.kv_heads, config.attention_head_dim,
                              config.rope_theta, **kw)
        self.attn_mhc = MHC(n, d, config.sinkhorn_iters, param_dtype=param_dtype, rngs=rngs)
        self.ffn_norm = RMSNorm(d, config.norm_eps, **kw)
        self.ffn = (MoE(d, config.moe, **kw) if config.is_moe_layer(layer)
                    else SwiGLU(d, config.ffn_hidden_size, **kw))
        self.ffn_mhc = MHC(n, d, config.sinkhorn_iters, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array,
                 hash_ids: jax.Array | None = None) -> jax.Array:
        """x (B, L, n, D), positions int (B, L), hash ids int32 (B, L, K) -> (B, L, n, D)."""
        single_fusion = self.engram is not None and self.engram.config.fusion == "single"
        if self.engram is not None:
            if hash_ids is None:
                raise ValueError(f"layer {self.layer} has an Engram module but got no hash ids")
            if not single_fusion:
                x = x + self.engram(x, hash_ids).astype(x.dtype)

        def attend(u):  # u (B, L, D): the streams after mHC's pre-mapping
            if single_fusion:
                u = u + self.engram(u[:, :, None, :], hash_ids)[:, :, 0].astype(u.dtype)
            return self.attn(self.attn_norm(u), positions)

        x = self.attn_mhc(x, attend)
        return self.ffn_mhc(x, lambda u: self.ffn(self.ffn_norm(u)))


    def engram_gates(self, x: jax.Array, hash_ids: jax.Array) -> jax.Array:
        """float32 (B, L, branches) gates of this block's Engram for its input streams x
        (B, L, n, D): one per stream, or one (the attention input's) with single fusion."""
        if self.engram is None:
            raise ValueError(f"block {self.layer} has no Engram module")
        hidden = x
        if self.engram.config.fusion == "single":
            hidden = self.attn_mhc.read(x)[:, :, None]
        return self.engram.gates(hidden, self.engram.embed(hash_ids))


def _run_block(block: Block, x, positions, hash_ids):
    return block(x, positions, hash_ids)


class Transformer(nnx.Module):
    """Decoder-only language model with optional MoE, Engram and mHC streams.

    Call with int tokens (B, L) and, when the config has Engram layers, `hash_ids`: a mapping
    from each Engram layer id to its int32 (B, L, K) ids. Returns float32 logits (B, L, V).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, v = config.hidden_size, config.vocab_size
        param_dtype = jnp.dtype(config.param_dtype)
        self.embed = logical_param(nnx.initializers.normal(1.0), rngs.params(), (v, d),
                                   param_dtype, (VOCAB, EMBED))
        self.blocks = nnx.List([Block(config, i, rngs=rngs) for i in range(config.num_layers)])
        self.merge = StreamMerge(config.hc_mult, d, config.stream_merge, param_dtype=param_dtype,
                                 rngs=rngs)
        self.final_norm = RMSNorm(d, config.norm_eps, dtype=jnp.float32, param_dtype=param_dtype,
                                  rngs=rngs)
        self.head = (None if config.tie_embeddings else
                     logical_param(scaled_normal(d), rngs.params(), (d, v), param_dtype,
                                   (EMBED, VOCAB)))

    def hidden_states(self, tokens: jax.Array, hash_ids: HashIds | None = None,
                      positions: jax.Array | None = None) -> list[jax.Array]:
        """The streams after the embedding and after each block: num_layers + 1 of (B, L, n, D)."""
        config = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, length), got {tokens.shape}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        hash_ids = dict(hash_ids or {})
        x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(config.dtype))
        x = constrain(expand_streams(x, config.hc_mult), STREAMS_AXES)
        run = _run_block
        if REMAT_POLICIES[config.remat] is not None:
            policy = getattr(jax.checkpoint_policies, REMAT_POLICIES[config.remat])
            run = nnx.remat(_run_block, policy=policy)
        states = [x]
        for block in self.blocks:
            x = constrain(run(block, x, positions, hash_ids.get(block.layer)), STREAMS_AXES)
            states.append(x)
        return states

    def logits(self, streams: jax.Array) -> jax.Array:
        """Streams (B, L, n, D) -> float32 logits (B, L, V) through merge, final norm and head."""
        return self.head_logits(self.merge(streams))

    def head_logits(self, merged: jax.Array) -> jax.Array:
        """Merged streams (B, L, D) -> float32 logits (B, L, V) through final norm and head."""
        h = self.final_norm(merged)
        if self.head is None:
            logits = h @ self.embed[...].astype(jnp.float32).T / np.sqrt(self.config.hidden_size)
        else:
            logits = h @ self.head[...].astype(jnp.float32)
        return constrain(logits, (BATCH, None, VOCAB))

    def __call__(self, tokens: jax.Array, hash_ids: HashIds | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden_states(tokens, hash_ids, positions)[-1])

    def moe_layers(self) -> list[MoE]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoE)]

    def update_router_biases(self) -> None:
        """One auxiliary-loss-free balancing step for every MoE layer (call once per step)."""
        for moe in self.moe_layers():
            moe.update_bias()
