"""The decoder: token embedding, n mHC streams, blocks, stream merge, final norm, LM head.

A block is
    x <- x + Engram(x, hash_ids)                  (Engram layers only; per-stream output)
    x <- mHC_attn(x, u -> Attention(RMSNorm(u)))
    x <- mHC_ffn(x,  u -> FFN or MoE(RMSNorm(u)))
with x of shape (B, L, n, D). With `engram.fusion: single` (an ablation) Engram instead reads
and adds to the attention input u: u <- u + Engram(u, hash_ids).
Hash ids come precomputed from the host (`NgramHasher`). With `model.scan_layers` every run of
identical consecutive blocks (the same FFN kind, no Engram: Engram tables differ in size per
layer) is one `BlockStack`, whose parameters carry a leading `layers` axis and which runs as one
`nnx.scan`, so the compiled program holds each kind of block once whatever the depth.
With segment ids (`data.document_mask`) attention, positions and the Engram convolution stay
within each packed document.
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
from engram_jax.nn.loss import chunked_cross_entropy
from engram_jax.nn.mhc import MHC, StreamMerge, expand_streams
from engram_jax.nn.moe import MoE
from engram_jax.nn.normalization import RMSNorm
from engram_jax.nn.params import logical_param, scaled_normal
from engram_jax.sharding.axes import BATCH, EMBED, LAYERS, VOCAB
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
                              config.rope_theta, kernel=config.attention, **kw)
        self.attn_mhc = MHC(n, d, config.sinkhorn_iters, param_dtype=param_dtype, rngs=rngs)
        self.ffn_norm = RMSNorm(d, config.norm_eps, **kw)
        self.ffn = (MoE(d, config.moe, **kw) if config.is_moe_layer(layer)
                    else SwiGLU(d, config.ffn_hidden_size, **kw))
        self.ffn_mhc = MHC(n, d, config.sinkhorn_iters, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, hash_ids: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """x (B, L, n, D), positions int (B, L), hash ids int32 (B, L, K), segment ids int
        (B, L) or None (one document per row) -> (B, L, n, D)."""
        single_fusion = self.engram is not None and self.engram.config.fusion == "single"
        if self.engram is not None:
            if hash_ids is None:
                raise ValueError(f"layer {self.layer} has an Engram module but got no hash ids")
            if not single_fusion:
                x = x + self.engram(x, hash_ids, segment_ids).astype(x.dtype)

        def attend(u):  # u (B, L, D): the streams after mHC's pre-mapping
            if single_fusion:
                u = u + self.engram(u[:, :, None, :], hash_ids, segment_ids)[:, :, 0].astype(
                    u.dtype)
            return self.attn(self.attn_norm(u), positions, segment_ids)

        x = self.attn_mhc(x, attend)
        return self.ffn_mhc(x, lambda u: self.ffn(self.ffn_norm(u)))

    def extend(self, x: jax.Array, positions: jax.Array, hash_ids: jax.Array | None,
               cache: dict, added: jax.Array, rows: jax.Array | None = None
               ) -> tuple[jax.Array, dict]:
        """The block on new tokens, for decoding: x (B, L, n, D) at positions (B, L), hash ids
        (B, L, K) or None, this block's cache (`Transformer.init_cache`), `added` int (B,) the
        tokens each row keeps, `rows` (B, L, E) table rows gathered by the caller or None.
        Returns x (B, L, n, D) and the updated cache."""
        new = dict(cache)
        single_fusion = self.engram is not None and self.engram.config.fusion == "single"

        def engram(hidden):
            y, new["conv"] = self.engram.extend(hidden, hash_ids, cache["conv"], added, rows)
            return y

        if self.engram is not None and not single_fusion:
            x = x + engram(x).astype(x.dtype)

        def attend(u):
            if single_fusion:
                u = u + engram(u[:, :, None, :])[:, :, 0].astype(u.dtype)
            out, kv = self.attn.extend(self.attn_norm(u), positions,
                                       {"k": cache["k"], "v": cache["v"]})
            new.update(kv)
            return out

        x = self.attn_mhc(x, attend)
        return self.ffn_mhc(x, lambda u: self.ffn(self.ffn_norm(u))), new

    def init_cache(self, batch: int, length: int) -> dict:
        """Zeros: keys and values "k", "v" (B, length, K, H) in the compute dtype and, with
        Engram, the convolution's history "conv" float32 (B, conv_span, branches, D)."""
        attn = self.attn
        kv = jnp.zeros((batch, length, *attn.wk.shape[1:]), attn.dtype)
        cache = {"k": kv, "v": kv}
        if self.engram is not None:
            cache["conv"] = jnp.zeros((batch, self.engram.conv_span, self.engram.hc_mult,
                                       self.engram.hidden_size), jnp.float32)
        return cache

    def engram_gates(self, x: jax.Array, hash_ids: jax.Array) -> jax.Array:
        """float32 (B, L, branches) gates of this block's Engram for its input streams x
        (B, L, n, D): one per stream, or one (the attention input's) with single fusion."""
        if self.engram is None:
            raise ValueError(f"block {self.layer} has no Engram module")
        hidden = x
        if self.engram.config.fusion == "single":
            hidden = self.attn_mhc.read(x)[:, :, None]
        return self.engram.gates(hidden, self.engram.embed(hash_ids))


class BlockStack(nnx.Module):
    """`count` identical blocks, layers `first` .. `first + count - 1`, with stacked parameters
    (leading axis `layers`), run as one `nnx.scan`."""

    def __init__(self, config: ModelConfig, first: int, count: int, *, rngs: nnx.Rngs):
        self.first, self.count = first, count

        @nnx.split_rngs(splits=count)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
        def create(rngs: nnx.Rngs) -> Block:
            return Block(config, first, rngs=rngs)

        self.layers = create(rngs)

    @property
    def layer_ids(self) -> range:
        return range(self.first, self.first + self.count)


def block_runs(config: ModelConfig) -> list[tuple[int, int]]:
    """(first layer, count) of each entry of `Transformer.blocks`: with `scan_layers`, maximal
    runs of consecutive blocks without Engram and of one FFN kind; otherwise one per block."""
    engram_layers = set(config.engram.layer_ids) if config.engram is not None else set()
    runs: list[tuple[int, int]] = []
    for layer in range(config.num_layers):
        if runs and config.scan_layers and layer not in engram_layers:
            first, count = runs[-1]
            last = first + count - 1
            if last not in engram_layers and config.is_moe_layer(last) == config.is_moe_layer(
                    layer):
                runs[-1] = (first, count + 1)
                continue
        runs.append((layer, 1))
    return runs


def _rematerialised(run, config: ModelConfig):
    policy = REMAT_POLICIES[config.remat]
    if policy is None:
        return run
    return nnx.remat(run, policy=getattr(jax.checkpoint_policies, policy))


def _run_block(block: Block, x, positions, hash_ids, segment_ids):
    return constrain(block(x, positions, hash_ids, segment_ids), STREAMS_AXES)


def _run_stack(stack: BlockStack, x, positions, segment_ids, remat, keep_states: bool):
    """Scans x through a stack; returns (x after it, the states after each of its blocks
    stacked (count, B, L, n, D), or None without `keep_states`)."""

    def step(block, x, positions, segment_ids):
        x = remat(block, x, positions, None, segment_ids)
        return x, (x if keep_states else None)

    scan = nnx.scan(step, in_axes=(0, nnx.Carry, None, None), out_axes=(nnx.Carry, 0))
    return scan(stack.layers, x, positions, segment_ids)


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """int32 (B, L) position of each token within its document, from segment ids (B, L) in
    which each document is a run of equal ids."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - first


class Transformer(nnx.Module):
    """Decoder-only language model with optional MoE, Engram and mHC streams.

    Call with int tokens (B, L) and, when the config has Engram layers, `hash_ids`: a mapping
    from each Engram layer id to its int32 (B, L, K) ids; with packed documents kept apart,
    `segment_ids` int (B, L). Returns float32 logits (B, L, V).

    `blocks` holds, per entry of `block_runs(config)`, a `Block` or a `BlockStack`.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, v = config.hidden_size, config.vocab_size
        param_dtype = jnp.dtype(config.param_dtype)
        self.embed = logical_param(nnx.initializers.normal(1.0), rngs.params(), (v, d),
                                   param_dtype, (VOCAB, EMBED))
        self.blocks = nnx.List([
            Block(config, first, rngs=rngs) if count == 1 else
            BlockStack(config, first, count, rngs=rngs) for first, count in block_runs(config)])
        self.merge = StreamMerge(config.hc_mult, d, config.stream_merge, param_dtype=param_dtype,
                                 rngs=rngs)
        self.final_norm = RMSNorm(d, config.norm_eps, dtype=jnp.float32, param_dtype=param_dtype,
                                  rngs=rngs)
        self.head = (None if config.tie_embeddings else
                     logical_param(scaled_normal(d), rngs.params(), (d, v), param_dtype,
                                   (EMBED, VOCAB)))

    def _streams(self, tokens, hash_ids, positions, segment_ids, keep_states: bool):
        config = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, length), got {tokens.shape}")
        if segment_ids is not None and segment_ids.shape != tokens.shape:
            raise ValueError(f"segment ids {segment_ids.shape} and tokens {tokens.shape} differ")
        if positions is None:
            positions = (document_positions(segment_ids) if segment_ids is not None else
                         jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))
        hash_ids = dict(hash_ids or {})
        x = self.embed_tokens(tokens)
        run = _rematerialised(_run_block, config)
        states = [x]
        for entry in self.blocks:
            if isinstance(entry, BlockStack):
                x, stacked = _run_stack(entry, x, positions, segment_ids, run, keep_states)
                if keep_states:
                    states.extend(stacked[i] for i in range(entry.count))
            else:
                x = run(entry, x, positions, hash_ids.get(entry.layer), segment_ids)
                states.append(x)
        return states if keep_states else x

    def hidden_states(self, tokens: jax.Array, hash_ids: HashIds | None = None,
                      positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> list[jax.Array]:
        """The streams after the embedding and after each block: num_layers + 1 of (B, L, n, D)."""
        return self._streams(tokens, hash_ids, positions, segment_ids, keep_states=True)

    def merged_streams(self, tokens: jax.Array, hash_ids: HashIds | None = None,
                       positions: jax.Array | None = None,
                       segment_ids: jax.Array | None = None) -> jax.Array:
        """The last block's streams merged into one: (B, L, D), the input of `head_logits`."""
        return self.merge(self._streams(tokens, hash_ids, positions, segment_ids,
                                        keep_states=False))

    def next_token_nll(self, tokens: jax.Array, hash_ids: HashIds | None = None,
                       segment_ids: jax.Array | None = None) -> jax.Array:
        """float32 (B, L) cross-entropy of each next token of int (B, L + 1) tokens (hash and
        segment ids for the first L), the logits built `config.logits_chunk` positions at a
        time (`nn.loss.chunked_cross_entropy`)."""
        merged = self.merged_streams(tokens[:, :-1], hash_ids, segment_ids=segment_ids)
        return chunked_cross_entropy(self.head_logits, merged, tokens[:, 1:],
                                     self.config.logits_chunk)

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
                 positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        return self.head_logits(self.merged_streams(tokens, hash_ids, positions, segment_ids))

    def init_cache(self, batch: int, length: int) -> dict:
        """The decoding state of `batch` empty sequences of at most `length` tokens:
        {"lengths": int32 (B,) tokens so far, "blocks": one cache per entry of `blocks`
        (`Block.init_cache`; a stack's with a leading axis of its blocks)}."""
        caches = []
        for entry in self.blocks:
            if isinstance(entry, BlockStack):
                one = nnx.eval_shape(lambda: Block(self.config, entry.first, rngs=nnx.Rngs(0)))
                caches.append(jax.tree.map(lambda a: jnp.zeros((entry.count, *a.shape), a.dtype),
                                           one.init_cache(batch, length)))
            else:
                caches.append(entry.init_cache(batch, length))
        return {"lengths": jnp.zeros((batch,), jnp.int32), "blocks": caches}

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """int (B, L) tokens -> the initial streams (B, L, n, D)."""
        x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(self.config.dtype))
        return constrain(expand_streams(x, self.config.hc_mult), STREAMS_AXES)

    def extend_blocks(self, x: jax.Array, hash_ids: HashIds | None, cache: dict,
                      added: jax.Array, rows: Mapping[int, jax.Array] | None = None,
                      entries: range | None = None) -> tuple[jax.Array, list]:
        """Streams x (B, L, n, D) of new tokens through the blocks `entries` (indices into
        `blocks`; all by default), at positions cache["lengths"] + 0..L-1. Returns the streams
        and the new caches of those entries (the others' unchanged); `lengths` is not moved."""
        hash_ids, rows = dict(hash_ids or {}), dict(rows or {})
        positions = cache["lengths"][:, None] + jnp.arange(x.shape[1], dtype=jnp.int32)
        caches = list(cache["blocks"])
        for index in entries if entries is not None else range(len(self.blocks)):
            entry = self.blocks[index]
            if isinstance(entry, BlockStack):
                def step(block, x, entry_cache):
                    return block.extend(x, positions, None, entry_cache, added)

                scan = nnx.scan(step, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
                x, caches[index] = scan(entry.layers, x, caches[index])
            else:
                x, caches[index] = entry.extend(x, positions, hash_ids.get(entry.layer),
                                                caches[index], added, rows.get(entry.layer))
        return x, caches

    def extend(self, tokens: jax.Array, hash_ids: HashIds | None, cache: dict,
               added: jax.Array, rows: Mapping[int, jax.Array] | None = None
               ) -> tuple[jax.Array, dict]:
        """Decoding: float32 logits (B, L, V) of new tokens int (B, L) after the `cache`'s, and
        the cache with them added. Row b keeps its first added[b] tokens (prefill of prompts of
        different lengths pads them on the right; the padding's logits mean nothing); equal to
        the full-sequence call at the same positions."""
        x, blocks = self.extend_blocks(self.embed_tokens(tokens), hash_ids, cache, added, rows)
        cache = {"lengths": cache["lengths"] + added.astype(jnp.int32), "blocks": blocks}
        return self.head_logits(self.merge(x)), cache

    def engram_blocks(self) -> list[Block]:
        """The blocks with an Engram module (never stacked), in layer order."""
        return [b for b in self.blocks if isinstance(b, Block) and b.engram is not None]

    def expert_loads(self) -> dict[int, jax.Array]:
        """Layer -> float32 (E,) tokens routed to each expert since the last bias update."""
        loads = {}
        for entry in self.blocks:
            if isinstance(entry, BlockStack) and isinstance(entry.layers.ffn, MoE):
                load = entry.layers.ffn.expert_load[...]
                loads.update({layer: load[i] for i, layer in enumerate(entry.layer_ids)})
            elif isinstance(entry, Block) and isinstance(entry.ffn, MoE):
                loads[entry.layer] = entry.ffn.expert_load[...]
        return loads

    def update_router_biases(self) -> None:
        """One auxiliary-loss-free balancing step for every MoE layer (call once per step)."""
        for entry in self.blocks:
            ffn = entry.layers.ffn if isinstance(entry, BlockStack) else entry.ffn
            if isinstance(ffn, MoE):
                ffn.update_bias()


def stack_blocks(config: ModelConfig, per_layer: Mapping) -> dict:
    """The `blocks` entry of a pure-dict state (`nnx.to_pure_dict`) of `config` built with
    `scan_layers: false` (one entry per layer), in the layout of `config` as it is: each run of
    `block_runs(config)` longer than one block becomes {"layers": leaves stacked on axis 0}."""
    entries = {}
    for index, (first, count) in enumerate(block_runs(config)):
        layers = [per_layer[layer] for layer in range(first, first + count)]
        entries[index] = layers[0] if count == 1 else {
            "layers": jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)}
    return entries
