"""The decoder: token embedding, n mHC streams, blocks, stream merge, final norm, LM head.

A block is
    x <- x + Engram(x, hash_ids)                  (Engram layers only; per-stream output)
    x <- mHC_attn(x, u -> Attention(RMSNorm(u)))
    x <- mHC_ffn(x,  u -> FFN or MoE(RMSNorm(u)))
with x of shape (B, L, n, D). With `engram.fusion: single` (an ablation) Engram instead reads
and adds to the attention input u: u <- u + Engram(u, hash_ids).
Hash ids come precomputed from the host (`NgramHasher`). With `model.scan_layers` every run of
consecutive blocks with the same FFN kind is one `BlockStack`, whose parameters carry a leading
`layers` axis and which runs as one `nnx.scan`, so the compiled program holds each kind of block
once whatever the depth. The run's Engram modules (their tables differ in size per layer) sit
beside the stacked blocks; their rows are looked up before the scan and the scanned body adds
the term of the block's own Engram module, or none, under a `lax.switch`.
With segment ids (`data.document_mask`) attention, positions and the Engram convolution stay
within each packed document.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

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
Rows = Mapping[int, jax.Array]  # layer -> (B, L, E) Engram rows gathered by the caller


def engram_module(config: ModelConfig, layer: int, *, rngs: nnx.Rngs) -> Engram | None:
    """Layer `layer`'s Engram module, or None when it has none."""
    engram = config.engram
    if engram is None or layer not in engram.layer_ids:
        return None
    branches = config.hc_mult if engram.fusion == "per_branch" else 1
    return Engram(engram, layer, config.hidden_size, branches, dtype=jnp.dtype(config.dtype),
                  param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)


# An Engram term: hidden (B, L, b, D) -> the term added to it, of the same shape.
EngramTerm = Callable[[jax.Array], jax.Array]


class Block(nnx.Module):
    """One decoder block (see the module docstring). Built `with_engram=False`, an Engram
    layer's block leaves its Engram module to the caller (`BlockStack`)."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs,
                 with_engram: bool = True):
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, n = config.hidden_size, config.hc_mult
        self.layer = layer
        self.single_fusion = config.engram is not None and config.engram.fusion == "single"
        self.engram = engram_module(config, layer, rngs=rngs) if with_engram else None
        self.attn_norm = RMSNorm(d, config.norm_eps, **kw)
        self.attn = Attention(d, config.num_heads, config.kv_heads, config.attention_head_dim,
                              config.rope_theta, kernel=config.attention, **kw)
        self.attn_mhc = MHC(n, d, config.sinkhorn_iters, param_dtype=param_dtype, rngs=rngs)
        self.ffn_norm = RMSNorm(d, config.norm_eps, **kw)
        self.ffn = (MoE(d, config.moe, **kw) if config.is_moe_layer(layer)
                    else SwiGLU(d, config.ffn_hidden_size, **kw))
        self.ffn_mhc = MHC(n, d, config.sinkhorn_iters, param_dtype=param_dtype, rngs=rngs)

    @property
    def engram_layers(self) -> list[int]:
        """[layer] with an Engram module of its own, else []."""
        return [] if self.engram is None else [self.layer]

    def _run(self, x: jax.Array, engram: EngramTerm | None,
             attention: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """x (B, L, n, D) through the Engram term (None: none), mHC around `attention` (its
        normalised input (B, L, D) -> (B, L, D)) and mHC around the FFN."""
        if engram is not None and not self.single_fusion:
            x = x + engram(x).astype(x.dtype)

        def attend(u):  # u (B, L, D): the streams after mHC's pre-mapping
            if engram is not None and self.single_fusion:
                u = u + engram(u[:, :, None, :])[:, :, 0].astype(u.dtype)
            return attention(self.attn_norm(u))

        x = self.attn_mhc(x, attend)
        return self.ffn_mhc(x, lambda u: self.ffn(self.ffn_norm(u)))

    def __call__(self, x: jax.Array, positions: jax.Array, hash_ids: jax.Array | None = None,
                 segment_ids: jax.Array | None = None,
                 engram: EngramTerm | None = None, rows: jax.Array | None = None) -> jax.Array:
        """x (B, L, n, D), positions int (B, L), hash ids int32 (B, L, K), segment ids int
        (B, L) or None (one document per row) -> (B, L, n, D). `engram` stands in for the
        block's own Engram module; `rows` (B, L, E), gathered by the caller, for its table."""
        if engram is None and self.engram is not None:
            if hash_ids is None:
                raise ValueError(f"layer {self.layer} has an Engram module but got no hash ids")
            engram = lambda hidden: self.engram(hidden, hash_ids, segment_ids, rows)  # noqa: E731
        return self._run(x, engram, lambda u: self.attn(u, positions, segment_ids))

    def extend(self, x: jax.Array, positions: jax.Array, hash_ids: jax.Array | None,
               cache: dict, added: jax.Array, rows: jax.Array | None = None,
               engram: EngramTerm | None = None) -> tuple[jax.Array, dict]:
        """The block on new tokens, for decoding: x (B, L, n, D) at positions (B, L), hash ids
        (B, L, K) or None, this block's cache (`Block.init_cache`), `added` int (B,) the tokens
        each row keeps, `rows` (B, L, E) table rows gathered by the caller or None; `engram`
        stands in for the block's own Engram module (and its convolution history). Returns x
        (B, L, n, D) and the updated cache."""
        new = dict(cache)
        if engram is None and self.engram is not None:
            def engram(hidden):
                y, new["conv"] = self.engram.extend(hidden, hash_ids, cache["conv"], added, rows)
                return y

        def attention(u):
            out, kv = self.attn.extend(u, positions, {"k": cache["k"], "v": cache["v"]})
            new.update(kv)
            return out

        return self._run(x, engram, attention), new

    def init_cache(self, batch: int, length: int) -> dict:
        """Zeros: keys and values "k", "v" (B, length, K, H) in the compute dtype and, with
        Engram, the convolution's history "conv" float32 (B, conv_span, branches, D)."""
        cache = _kv_cache(self.attn, batch, length, ())
        if self.engram is not None:
            cache["conv"] = _conv_history(self.engram, batch)
        return cache


def _kv_cache(attn: Attention, batch: int, length: int, lead: tuple[int, ...]) -> dict:
    """Zero keys and values {"k", "v"}: lead + (B, length, K, H) in the compute dtype."""
    kv = jnp.zeros((*lead, batch, length, *attn.wk.shape[-2:]), attn.dtype)
    return {"k": kv, "v": kv}


def _conv_history(engram: Engram, batch: int) -> jax.Array:
    """Zeros float32 (B, conv_span, branches, D): the short convolution's history."""
    return jnp.zeros((batch, engram.conv_span, engram.hc_mult, engram.hidden_size), jnp.float32)


def _layer_slice(module: nnx.Module, index: int) -> nnx.Module:
    """A copy of a stacked module (parameters with a leading `layers` axis) at `index`."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))


class BlockStack(nnx.Module):
    """`count` blocks with one FFN kind, layers `first` .. `first + count - 1`, with stacked
    parameters (leading axis `layers`), run as one `nnx.scan`.

    The Engram modules of the run's Engram layers (their tables differ in size) sit beside the
    stack in `engram` (str(layer) -> Engram, or None when the run has none); in the scanned body
    a `lax.switch` on the layer adds the term of the layer's Engram module, or nothing, so the
    compiled program holds one body for the whole run.
    """

    def __init__(self, config: ModelConfig, first: int, count: int, *, rngs: nnx.Rngs):
        self.first, self.count = first, count

        @nnx.split_rngs(splits=count)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
        def create(rngs: nnx.Rngs) -> Block:
            return Block(config, first, rngs=rngs, with_engram=False)

        self.layers = create(rngs)
        engrams = {str(layer): engram_module(config, layer, rngs=rngs)
                   for layer in self.layer_ids}
        engrams = {k: v for k, v in engrams.items() if v is not None}
        self.engram = nnx.Dict(engrams) if engrams else None

    @property
    def layer_ids(self) -> range:
        return range(self.first, self.first + self.count)

    @property
    def engram_layers(self) -> list[int]:
        """The run's Engram layers, in order."""
        return _engram_layers(self.engram)

    def slots(self) -> jax.Array:
        """int32 (count,): per block, 1 + the index of its Engram layer in `engram_layers`, or
        0 without one (the branch the scanned body's switch takes)."""
        engram_layers = self.engram_layers
        return jnp.asarray([engram_layers.index(layer) + 1 if layer in engram_layers else 0
                            for layer in self.layer_ids], jnp.int32)

    def init_cache(self, batch: int, length: int) -> dict:
        """Zeros: {"layers": keys and values (`Block.init_cache`) with a leading axis of the
        blocks, "conv": str(layer) -> the convolution history of each Engram layer}."""
        return {"layers": _kv_cache(self.layers.attn, batch, length, (self.count,)),
                "conv": {str(layer): _conv_history(self.engram[str(layer)], batch)
                         for layer in self.engram_layers}}


def _engram_layers(engrams: nnx.Dict | None) -> list[int]:
    return [] if engrams is None else sorted(int(k) for k in engrams.keys())


def _engram_switch(engrams: nnx.Dict, slot: jax.Array, term, hidden: jax.Array, carried):
    """The Engram term of a stack's block at `slot` (`BlockStack.slots`) under `lax.switch`.

    `term(index, module, hidden, carried) -> (Y, carried)` computes the term of the stack's
    index-th Engram layer (modules `engrams`); slot 0 gives zeros and `carried` unchanged.
    Returns (Y, carried)."""
    def absent(hidden, carried):
        return jnp.zeros_like(hidden), carried

    def branch(index, module):
        def run(hidden, carried):
            y, carried = term(index, module, hidden, carried)
            return y.astype(hidden.dtype), carried
        return run

    branches = [absent] + [branch(i, engrams[str(layer)])
                           for i, layer in enumerate(_engram_layers(engrams))]
    return jax.lax.switch(slot, branches, hidden, carried)


def block_runs(config: ModelConfig) -> list[tuple[int, int]]:
    """(first layer, count) of each entry of `Transformer.blocks`: with `scan_layers`, maximal
    runs of consecutive blocks of one FFN kind (Engram layers included); otherwise one per
    block."""
    runs: list[tuple[int, int]] = []
    for layer in range(config.num_layers):
        if runs and config.scan_layers:
            first, count = runs[-1]
            if config.is_moe_layer(first) == config.is_moe_layer(layer):
                runs[-1] = (first, count + 1)
                continue
        runs.append((layer, 1))
    return runs


def _rematerialised(run, config: ModelConfig):
    policy = REMAT_POLICIES[config.remat]
    if policy is None:
        return run
    return nnx.remat(run, policy=getattr(jax.checkpoint_policies, policy))


def _run_block(block: Block, x, positions, hash_ids, segment_ids, rows):
    return constrain(block(x, positions, hash_ids, segment_ids, rows=rows), STREAMS_AXES)


def _engram_term(module: Engram, hidden, memory, segment_ids):
    """`Engram.term`, rematerialised: under the scanned body's switch every branch's residuals
    are outputs of the switch (zeros from the branches not taken), so without it each block of
    the run would write the Engram layer's (B, L, G, D) intermediates."""
    graphdef, state = nnx.split(module)

    def term(state, hidden, memory):
        return nnx.merge(graphdef, state).term(hidden, memory, segment_ids)

    return jax.checkpoint(term)(state, hidden, memory)


def _run_stacked_block(block: Block, engrams: nnx.Dict | None, x, positions, memory,
                       segment_ids, slot):
    """One block of a stack (its Engram modules `engrams`): x (B, L, n, D) -> (x', float32
    (branches,) gate means of its Engram layer, zeros without one, or None without Engram
    modules). memory: the looked-up rows (B, L, E), one per `BlockStack.engram_layers`."""
    if engrams is None:
        return _run_block(block, x, positions, None, segment_ids, None), None
    gates = {}

    def term(index, module, hidden, _):
        y, gate = _engram_term(module, hidden, memory[index], segment_ids)
        return y, jnp.mean(gate, axis=(0, 1))

    def engram(hidden):
        y, gates["mean"] = _engram_switch(engrams, slot, term, hidden,
                                          jnp.zeros((hidden.shape[2],), jnp.float32))
        return y

    x = block(x, positions, None, segment_ids, engram=engram)
    return constrain(x, STREAMS_AXES), gates["mean"]


def _run_stack(stack: BlockStack, x, positions, hash_ids, segment_ids, remat,
               keep_states: bool, rows):
    """Scans x through a stack; returns x after it and the states after each of its blocks
    stacked (count, B, L, n, D), or None without `keep_states`. Sets the gate means of the
    stack's Engram modules. The Engram rows are looked up before the scan (hash ids depend
    only on tokens), so the scanned body holds no lookup and its collectives; `rows` (layer ->
    (B, L, E)) are rows the caller gathered."""
    missing = [layer for layer in stack.engram_layers if layer not in hash_ids]
    if missing:
        raise ValueError(f"layers {missing} have Engram modules but got no hash ids")
    engrams = {layer: stack.engram[str(layer)] for layer in stack.engram_layers}
    memory = tuple(rows[layer].astype(module.dtype) if layer in rows else
                   module.embed(hash_ids[layer]) for layer, module in engrams.items())

    def step(block, engrams, x, slot):
        x, gate = remat(block, engrams, x, positions, memory, segment_ids, slot)
        return x, (x if keep_states else None, gate)

    scan = nnx.scan(step, in_axes=(0, None, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    x, (states, gates) = scan(stack.layers, stack.engram, x, stack.slots())
    for layer in stack.engram_layers:
        stack.engram[str(layer)].gate_mean[...] = gates[layer - stack.first]
    return x, states


def _extend_stack(stack: BlockStack, x, positions, hash_ids, cache, added, rows):
    """`Block.extend` scanned through a stack: x (B, L, n, D), its cache
    (`BlockStack.init_cache`), hash ids and gathered rows by layer. Returns x and the cache."""
    layers = stack.engram_layers
    ids = tuple(hash_ids.get(layer) for layer in layers)
    memory = tuple(rows[layer] if layer in rows else stack.engram[str(layer)].embed(ids[i])
                   for i, layer in enumerate(layers))

    def term(index, module, hidden, histories):
        y, history = module.extend(hidden, ids[index], histories[index], added, memory[index])
        return y, histories[:index] + (history,) + histories[index + 1:]

    def step(block, engrams, carry, block_cache, slot):
        x, histories = carry
        out = {"histories": histories}

        def engram(hidden):
            y, out["histories"] = _engram_switch(engrams, slot, term, hidden, histories)
            return y

        x, block_cache = block.extend(x, positions, None, block_cache, added,
                                      engram=engram if layers else None)
        return (x, out["histories"]), block_cache

    scan = nnx.scan(step, in_axes=(0, None, nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
    histories = tuple(cache["conv"][str(layer)] for layer in layers)
    (x, histories), kv = scan(stack.layers, stack.engram, (x, histories), cache["layers"],
                              stack.slots())
    return x, {"layers": kv, "conv": {str(layer): h for layer, h in zip(layers, histories)}}


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

    def _streams(self, tokens, hash_ids, positions, segment_ids, keep_states: bool,
                 rows: Rows | None = None):
        config = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, length), got {tokens.shape}")
        if segment_ids is not None and segment_ids.shape != tokens.shape:
            raise ValueError(f"segment ids {segment_ids.shape} and tokens {tokens.shape} differ")
        if positions is None:
            positions = (document_positions(segment_ids) if segment_ids is not None else
                         jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))
        hash_ids, rows = dict(hash_ids or {}), dict(rows or {})
        x = self.embed_tokens(tokens)
        run = _rematerialised(_run_block, config)
        run_stacked = _rematerialised(_run_stacked_block, config)
        states = [x]
        for entry in self.blocks:
            if isinstance(entry, BlockStack):
                x, stacked = _run_stack(entry, x, positions, hash_ids, segment_ids, run_stacked,
                                        keep_states, rows)
                if keep_states:
                    states.extend(stacked[i] for i in range(entry.count))
            else:
                x = run(entry, x, positions, hash_ids.get(entry.layer), segment_ids,
                        rows.get(entry.layer))
                states.append(x)
        return states if keep_states else x

    def hidden_states(self, tokens: jax.Array, hash_ids: HashIds | None = None,
                      positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> list[jax.Array]:
        """The streams after the embedding and after each block: num_layers + 1 of (B, L, n, D)."""
        return self._streams(tokens, hash_ids, positions, segment_ids, keep_states=True)

    def merged_streams(self, tokens: jax.Array, hash_ids: HashIds | None = None,
                       positions: jax.Array | None = None,
                       segment_ids: jax.Array | None = None,
                       rows: Rows | None = None) -> jax.Array:
        """The last block's streams merged into one: (B, L, D), the input of `head_logits`.
        `rows` {layer: (B, L, E)}: Engram rows gathered by the caller (`Engram.embed`), which
        stand in for those layers' tables."""
        return self.merge(self._streams(tokens, hash_ids, positions, segment_ids,
                                        keep_states=False, rows=rows))

    def next_token_nll(self, tokens: jax.Array, hash_ids: HashIds | None = None,
                       segment_ids: jax.Array | None = None,
                       rows: Rows | None = None) -> jax.Array:
        """float32 (B, L) cross-entropy of each next token of int (B, L + 1) tokens (hash and
        segment ids and Engram `rows` as `merged_streams`, for the first L), the logits built
        `config.logits_chunk` positions at a time (`nn.loss.chunked_cross_entropy`)."""
        merged = self.merged_streams(tokens[:, :-1], hash_ids, segment_ids=segment_ids,
                                     rows=rows)
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
        (`Block.init_cache`, `BlockStack.init_cache`)}."""
        return {"lengths": jnp.zeros((batch,), jnp.int32),
                "blocks": [entry.init_cache(batch, length) for entry in self.blocks]}

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
                x, caches[index] = _extend_stack(entry, x, positions, hash_ids, caches[index],
                                                 added, rows)
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

    def engram_modules(self) -> dict[int, Engram]:
        """Layer -> its Engram module, in layer order."""
        modules = {}
        for entry in self.blocks:
            for layer in entry.engram_layers:
                modules[layer] = (entry.engram[str(layer)] if isinstance(entry, BlockStack)
                                  else entry.engram)
        return modules

    def engram_gates(self, states: list[jax.Array], hash_ids: HashIds) -> dict[int, jax.Array]:
        """Layer -> float32 (B, L, branches) gates of each Engram layer, from the streams
        before each block (`hidden_states`) and the hash ids: one per stream, or one (the
        attention input's) with single fusion."""
        gates = {}
        for entry in self.blocks:
            stacked = isinstance(entry, BlockStack)
            for layer in entry.engram_layers:
                module = entry.engram[str(layer)] if stacked else entry.engram
                hidden = states[layer]
                if module.config.fusion == "single":
                    mhc = (_layer_slice(entry.layers.attn_mhc, layer - entry.first) if stacked
                           else entry.attn_mhc)
                    hidden = mhc.read(hidden)[:, :, None]
                gates[layer] = module.gates(hidden, module.embed(hash_ids[layer]))
        return gates

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


def is_engram_table(path: tuple) -> bool:
    """Whether an nnx state path (as `nnx.to_flat_state` and nnx filters give it) names an
    Engram table, in either layout of the blocks."""
    return "engram" in path and path[-1] == "table"


def stack_blocks(config: ModelConfig, per_layer: Mapping) -> dict:
    """The `blocks` entry of a pure-dict state (`nnx.to_pure_dict`) of `config` built with
    `scan_layers: false` (one entry per layer), in the layout of `config` as it is: each run of
    `block_runs(config)` longer than one block becomes {"layers": leaves stacked on axis 0} and,
    with Engram layers, "engram": {str(layer): that layer's Engram module}."""
    entries = {}
    for index, (first, count) in enumerate(block_runs(config)):
        layers = [dict(per_layer[layer]) for layer in range(first, first + count)]
        if count == 1:
            entries[index] = layers[0]
            continue
        engrams = {str(first + i): block.pop("engram") for i, block in enumerate(layers)
                   if "engram" in block}
        entries[index] = {"layers": jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)}
        if engrams:
            entries[index]["engram"] = engrams
    return entries
