"""The configuration dataclasses: what a run is, validated field by field.

Every class is a frozen dataclass whose `__post_init__` checks its own fields and raises
`ConfigError` naming the dotted key (`engram.max_ngram_size=1: must be >= 2`). Reading them from
YAML, overrides and presets is `engram_jax.config.loader`; nothing here touches files or jax.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the field."""


ENGRAM_FUSIONS = ("per_branch", "single")
ENGRAM_LOOKUPS = ("all_to_all", "routed", "auto")
TABLE_PLACEMENTS = ("device", "host")


@dataclasses.dataclass(frozen=True)
class EngramConfig:
    """Engram hashing and module settings. Defaults are the reference demo's.

    Attributes:
      vocab_size_per_ngram: table size to start the prime search from, one per order 2..N.
      max_ngram_size: N, the largest n-gram order (orders 2..N are used).
      n_embed_per_ngram: embedding width of one order; each of its heads gets width / heads.
      n_head_per_ngram: H, hash heads per order, each with its own prime-sized table.
      layer_ids: 0-based indices of the blocks that carry an Engram module.
      pad_id: token id (before compression) read at positions before the sequence start.
      seed: base seed of the per-layer hash multipliers.
      kernel_size: short-convolution kernel size.
      conv_dilation: short-convolution dilation; None means N (the reference).
      conv_zero_init: start the short convolution at zero (paper) rather than the framework's
        default random init (reference demo).
      reset_at_document_boundary: in packed sequences, read `pad_id` instead of tokens of the
        previous document (off in the reference).
      tokenizer_compression: map tokens to compressed ids before hashing (paper: on).
      table_row_multiple: each layer's table is padded with unused rows to a multiple of this,
        so it splits into equal shards over any number of devices dividing it.
      lookup: how a table whose rows are split over devices is read: "all_to_all" (each device
        sends its distinct ids to their owners and gets the rows back,
        `engram_jax.sharding.lookup.exchange_lookup`), "routed" (ids all-gathered, each device
        reads the rows it owns for the gathered batch, `routed_lookup`) or "auto" (the
        compiler's gather, which all-reduces the whole output). The last two are kept for
        comparison.
      lookup_capacity: with "all_to_all", the ids a device sends each owner per round, as a
        multiple of an even split of its ids; more distinct ids for one owner take more rounds.
      gated: compute the context-aware gate; False fixes it at 1 (an ablation).
      fusion: "per_branch" (a gate per mHC stream, the output added to every stream) or
        "single" (the paper's ablation: one gate on the attention input after mHC's
        pre-mapping, the output added to that input only).
      short_conv: add the short convolution; False makes the output the gated value (an ablation).
      table_placement: where the tables live in training: "device" (model parameters) or "host"
        (numpy arrays in this process's memory, `engram_jax.train.host_tables`: rows gathered
        on the host for each batch and shipped with it, updated there by lazy Adam; needs
        `train.table_optimizer: sparse_adam`). The model then holds (0, head_dim) tables.
    """

    vocab_size_per_ngram: tuple[int, ...] = (129280 * 5, 129280 * 5)
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    layer_ids: tuple[int, ...] = (1, 15)
    pad_id: int = 2
    seed: int = 0
    kernel_size: int = 4
    conv_dilation: int | None = None
    conv_zero_init: bool = True
    reset_at_document_boundary: bool = False
    tokenizer_compression: bool = True
    table_row_multiple: int = 256
    lookup: str = "all_to_all"
    lookup_capacity: float = 0.75
    gated: bool = True
    fusion: str = "per_branch"
    short_conv: bool = True
    table_placement: str = "device"

    def __post_init__(self):
        object.__setattr__(self, "vocab_size_per_ngram", tuple(self.vocab_size_per_ngram))
        object.__setattr__(self, "layer_ids", tuple(self.layer_ids))
        _check(self.max_ngram_size >= 2, "max_ngram_size", self.max_ngram_size, "must be >= 2")
        _check(len(self.vocab_size_per_ngram) == self.max_ngram_size - 1, "vocab_size_per_ngram",
               self.vocab_size_per_ngram,
               f"needs one entry per order 2..{self.max_ngram_size} "
               f"({self.max_ngram_size - 1} entries)")
        _check(all(v >= 2 for v in self.vocab_size_per_ngram), "vocab_size_per_ngram",
               self.vocab_size_per_ngram, "every size must be >= 2")
        _check(self.n_head_per_ngram >= 1, "n_head_per_ngram", self.n_head_per_ngram,
               "must be >= 1")
        _check(self.n_embed_per_ngram % self.n_head_per_ngram == 0, "n_embed_per_ngram",
               self.n_embed_per_ngram, f"must be divisible by n_head_per_ngram="
               f"{self.n_head_per_ngram}")
        _check(self.n_embed_per_ngram >= self.n_head_per_ngram, "n_embed_per_ngram",
               self.n_embed_per_ngram, "must be positive")
        _check(len(set(self.layer_ids)) == len(self.layer_ids), "layer_ids", self.layer_ids,
               "must not repeat a layer")
        _check(all(i >= 0 for i in self.layer_ids), "layer_ids", self.layer_ids,
               "must be >= 0 (0-based block indices)")
        _check(self.pad_id >= 0, "pad_id", self.pad_id, "must be a token id (>= 0)")
        _check(self.kernel_size >= 1, "kernel_size", self.kernel_size, "must be >= 1")
        _check(self.conv_dilation is None or self.conv_dilation >= 1, "conv_dilation",
               self.conv_dilation, "must be >= 1 or null")
        _check(self.table_row_multiple >= 1, "table_row_multiple", self.table_row_multiple,
               "must be >= 1")
        _check(self.lookup in ENGRAM_LOOKUPS, "lookup", self.lookup,
               f"must be one of {ENGRAM_LOOKUPS}")
        _check(self.lookup_capacity > 0, "lookup_capacity", self.lookup_capacity, "must be > 0")
        _check(self.fusion in ENGRAM_FUSIONS, "fusion", self.fusion,
               f"must be one of {ENGRAM_FUSIONS}")
        _check(self.table_placement in TABLE_PLACEMENTS, "table_placement", self.table_placement,
               f"must be one of {TABLE_PLACEMENTS}")

    @property
    def num_heads(self) -> int:
        """Hash heads per layer: (N-1) * H."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def head_dim(self) -> int:
        """Width of one head's table rows."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def embed_dim(self) -> int:
        """Width of the concatenated lookup: (N-1) * n_embed_per_ngram."""
        return (self.max_ngram_size - 1) * self.n_embed_per_ngram

    @property
    def dilation(self) -> int:
        return self.conv_dilation or self.max_ngram_size


def _check(ok: bool, field: str, value: Any, why: str, section: str = "engram") -> None:
    if not ok:
        raise ConfigError(f"{section}.{field}={value!r}: {why}")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE feed-forward settings.

    Attributes:
      num_routed_experts: fine-grained experts chosen by the router.
      num_shared_experts: experts every token uses.
      top_k: routed experts per token.
      expert_hidden_size: hidden width of one expert's SwiGLU.
      first_dense_layers: the first k blocks use the dense FFN instead.
      bias_update_rate: step of the auxiliary-loss-free balancing bias, per update.
      capacity_factor: None for dropless dispatch; else each expert takes at most
        ceil(capacity_factor * tokens * top_k / num_routed_experts) tokens and drops the rest
        (on a mesh: of each batch shard's tokens).
      routed_scale: multiplier of the normalised routing weights.
      exchange_capacity: with experts split over devices (`sharding.expert` > 1), the buffer
        each device sends to each other per round, as a multiple of the balanced load; a step
        in which a device has more for one destination takes more rounds, so dropless dispatch
        stays exact.
    """

    num_routed_experts: int = 8
    num_shared_experts: int = 1
    top_k: int = 2
    expert_hidden_size: int = 256
    first_dense_layers: int = 1
    bias_update_rate: float = 1e-3
    capacity_factor: float | None = None
    routed_scale: float = 1.0
    exchange_capacity: float = 1.25

    def __post_init__(self):
        check = lambda ok, field, why: _check(ok, field, getattr(self, field), why, "model.moe")
        check(self.num_routed_experts >= 1, "num_routed_experts", "must be >= 1")
        check(self.num_shared_experts >= 0, "num_shared_experts", "must be >= 0")
        check(1 <= self.top_k <= self.num_routed_experts, "top_k",
              f"must be in [1, num_routed_experts={self.num_routed_experts}]")
        check(self.expert_hidden_size >= 1, "expert_hidden_size", "must be >= 1")
        check(self.first_dense_layers >= 0, "first_dense_layers", "must be >= 0")
        check(self.bias_update_rate >= 0, "bias_update_rate", "must be >= 0")
        check(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
              "must be > 0 or null (dropless)")
        check(self.routed_scale > 0, "routed_scale", "must be > 0")
        check(self.exchange_capacity > 0, "exchange_capacity", "must be > 0")


DTYPES = ("float32", "bfloat16", "float16")
STREAM_MERGES = ("sum", "learned")
# Per-block rematerialisation: config name -> the `jax.checkpoint_policies` member it uses
# (None: no rematerialisation).
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash")
REMAT_POLICIES = {"none": None, "full": "nothing_saveable",
                  "save_dots": "dots_with_no_batch_dims_saveable"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The decoder: embeddings, blocks (Engram, attention, FFN or MoE, each behind mHC), head.

    Attributes:
      vocab_size: token vocabulary (at least the tokenizer's length).
      hidden_size: D, the width of each residual stream.
      num_layers: number of blocks.
      num_heads: attention query heads.
      num_kv_heads: key/value heads (GQA); None means num_heads (MHA).
      head_dim: width of one head; None means hidden_size // num_heads.
      ffn_hidden_size: hidden width of the dense SwiGLU FFN.
      hc_mult: n, the number of mHC residual streams (1: a plain residual).
      sinkhorn_iters: Sinkhorn iterations of the mHC residual matrix.
      stream_merge: how streams become one before the final norm: "sum", or "learned" (a
        pre-style dynamic weighting).
      rope_theta: RoPE base.
      norm_eps: eps of the backbone RMSNorms.
      tie_embeddings: the LM head reuses the token embedding.
      dtype: compute dtype; param_dtype: storage dtype.
      remat: activation rematerialisation per block: "none", "full", or "save_dots".
      scan_layers: run each run of consecutive blocks with the same FFN kind as one `nnx.scan`
        over stacked parameters (a run's Engram layers included: their modules sit beside the
        stack), so compile time does not grow with depth.
        Checkpoints store the blocks in this layout: a checkpoint written with the other
        setting is refused with a message saying so.
      attention: the attention kernel: "auto" (the platform's: "splash" on TPU, "cudnn" on
        GPU, "xla" elsewhere), "xla" (builds the L x L scores), "cudnn" (cuDNN flash
        attention, GPU, bf16/fp16) or "splash" (the Pallas splash-attention kernel, TPU).
      logits_chunk: the training and evaluation losses build the (tokens, vocab) logits this many
        positions of the sequence at a time, each chunk rematerialised in the backward pass, so
        the float32 logits and their gradient never exist for the whole sequence at once (the
        largest divisor of the length that is at most this; 0: the whole sequence at once).
      moe: DeepSeekMoE settings, or None for dense FFNs everywhere.
      engram: Engram settings, or None for no Engram.
    """

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_hidden_size: int = 704
    hc_mult: int = 4
    sinkhorn_iters: int = 20
    stream_merge: str = "sum"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    attention: str = "auto"
    logits_chunk: int = 1024
    moe: MoEConfig | None = None
    engram: EngramConfig | None = None

    def __post_init__(self):
        check = lambda ok, field, why: _check(ok, field, getattr(self, field), why, "model")
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size",
                      "hc_mult", "sinkhorn_iters"):
            check(getattr(self, field) >= 1, field, "must be >= 1")
        if self.head_dim is None:
            check(self.hidden_size % self.num_heads == 0, "hidden_size",
                  f"must be divisible by num_heads={self.num_heads} (or set head_dim)")
        else:
            check(self.head_dim >= 1 and self.head_dim % 2 == 0, "head_dim",
                  "must be even and >= 2 (RoPE rotates pairs)")
        check(self.num_heads % self.kv_heads == 0, "num_kv_heads",
              f"must divide num_heads={self.num_heads}")
        check(self.attention_head_dim % 2 == 0, "num_heads",
              f"gives head_dim={self.attention_head_dim}, which must be even for RoPE")
        check(self.stream_merge in STREAM_MERGES, "stream_merge", f"must be one of {STREAM_MERGES}")
        check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        check(self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}")
        check(self.remat in REMAT_POLICIES, "remat", f"must be one of {tuple(REMAT_POLICIES)}")
        check(self.attention in ATTENTION_KERNELS, "attention",
              f"must be one of {ATTENTION_KERNELS}")
        check(self.logits_chunk >= 0, "logits_chunk", "must be >= 0 (0: no chunking)")
        if self.moe is not None:
            _check(self.moe.first_dense_layers <= self.num_layers, "first_dense_layers",
                   self.moe.first_dense_layers,
                   f"must be <= num_layers={self.num_layers}", "model.moe")
        if self.engram is not None:
            beyond = [i for i in self.engram.layer_ids if i >= self.num_layers]
            _check(not beyond, "layer_ids", self.engram.layer_ids,
                   f"layer {beyond[0] if beyond else ''} is beyond the depth "
                   f"(num_layers={self.num_layers}; ids are 0-based)", "model.engram")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.moe.first_dense_layers


# The device mesh's axes, in mesh order; `ShardingConfig` has one size field per axis. What each
# axis splits is the rule table of `engram_jax.sharding.axes`.
MESH_AXES = ("data", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """How a model is laid out on devices.

    Attributes:
      data, fsdp, expert, tensor: mesh axis sizes; -1 on one axis means "all remaining devices".
      engram_table_axes: mesh axes the Engram tables' rows are split over (default: all).

    How a split table is read is `EngramConfig.lookup` ("all_to_all", "routed" or "auto").
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    engram_table_axes: tuple[str, ...] = MESH_AXES

    def __post_init__(self):
        object.__setattr__(self, "engram_table_axes", tuple(self.engram_table_axes))
        sizes = [getattr(self, a) for a in MESH_AXES]
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"sharding axis sizes {dict(zip(MESH_AXES, sizes))}: each must be "
                              ">= 1, and at most one may be -1")
        unknown = [a for a in self.engram_table_axes if a not in MESH_AXES]
        if unknown:
            raise ConfigError(f"sharding.engram_table_axes={self.engram_table_axes}: unknown "
                              f"axis {unknown[0]!r} (axes: {MESH_AXES})")

    def axis_sizes(self, num_devices: int) -> tuple[int, ...]:
        """The four axis sizes for `num_devices` devices, resolving a -1."""
        sizes = [getattr(self, a) for a in MESH_AXES]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(f"sharding: {num_devices} devices cannot be split into axes "
                                  f"{dict(zip(MESH_AXES, sizes))}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ConfigError(f"sharding: axes {dict(zip(MESH_AXES, sizes))} use "
                              f"{math.prod(sizes)} devices, but {num_devices} are available")
        return tuple(sizes)


DATA_SOURCES = ("stdlib", "text", "jsonl", "parquet", "array_record", "hf")


def _check_source(where, section: str) -> None:
    """A source's keys (of a `DataConfig` or a `MixtureSource`) name documents it can read."""
    check = lambda ok, field, why: _check(ok, field, getattr(where, field), why, section)
    check(where.source in DATA_SOURCES, "source", f"must be one of {DATA_SOURCES}")
    check(where.source in ("stdlib", "hf") or bool(where.paths) or (
        section == "data" and bool(getattr(where, "mixture", ()))), "paths",
        f"source {where.source!r} needs at least one path or glob")
    check(where.source != "hf" or bool(where.hf_name), "hf_name", "source 'hf' needs hf_name")


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One source of a data mixture (`DataConfig.mixture`).

    Attributes:
      name: how metrics name it (`val_loss/<name>`); unique within the mixture.
      weight: its share of the training windows, relative to the others' (> 0).
      source, paths, field, hf_name, hf_split: where its documents come from, as the
        `DataConfig` keys of the same names; every other data setting (split, tokenizer,
        seq_len, ...) is the mixture's.
    """

    name: str
    weight: float = 1.0
    source: str = "array_record"
    paths: tuple[str, ...] = ()
    field: str = "text"
    hf_name: str | None = None
    hf_split: str = "train"

    def __post_init__(self):
        paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
        object.__setattr__(self, "paths", paths)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training text comes from and how it becomes batches.

    Attributes:
      source: "stdlib" (the running interpreter's standard-library sources: the embedded default
        corpus), "text" (files or globs in `paths`), "jsonl" (field `field` of each line),
        "parquet" (column `field`), "array_record" (pre-tokenised shards from
        `python -m engram_jax.pretokenize`), or "hf" (a Hugging Face dataset `hf_name`, needs the
        `datasets` package and network).
      paths: files or glob patterns for the file sources.
      field: JSONL field or Parquet / HF column holding the text.
      hf_name, hf_split: the Hugging Face dataset and split.
      validation_percent: share of documents held out, chosen by a hash of each document's
        path (or index), so the split never changes.
      tokenizer: a tokenizer file, directory or hub name; None trains (once, cached) a
        byte-level BPE of `tokenizer_vocab_size` on the training split.
      eod_token: the token that ends each document in the packed stream; None takes the
        tokenizer's end-of-sequence token, else `<|endoftext|>`, else its beginning-of-sequence
        token.
      seq_len: tokens per training sequence (documents are packed, each ended by `eod_token`).
      document_mask: keep packed documents apart: batches carry segment ids, attention does
        not cross a document boundary, positions restart at each document, and the Engram hash
        ids and short convolution read nothing of the previous document (implies
        `engram.reset_at_document_boundary`). Each document then computes as if alone.
      num_threads: pipeline threads (tokenising is done up front; hashing runs here).
      prefetch: batches prepared ahead of the device.
      cache_dir: where tokenizers and tokenised corpora are cached (default: see
        `tokenizer.default_cache_dir`).
      mixture: several sources mixed by weight (`MixtureSource`), in place of `source` and
        `paths`: training windows are drawn from each in proportion to its weight, and each
        has its own validation figures. They share one tokenizer: a resumed run's, else
        `tokenizer`, else the first source's (a pre-tokenised source's own, or the default BPE
        trained on a text source's training split); a pre-tokenised source made with another
        is refused.
    """

    source: str = "stdlib"
    paths: tuple[str, ...] = ()
    field: str = "text"
    hf_name: str | None = None
    hf_split: str = "train"
    validation_percent: float = 5.0
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 4096
    eod_token: str | None = None
    seq_len: int = 256
    document_mask: bool = False
    num_threads: int = 2
    prefetch: int = 4
    cache_dir: str | None = None
    mixture: tuple[MixtureSource, ...] = ()

    def __post_init__(self):
        paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
        object.__setattr__(self, "paths", paths)
        object.__setattr__(self, "mixture", tuple(self.mixture))
        check = lambda ok, field, why: _check(ok, field, getattr(self, field), why, "data")
        _check_source(self, "data")
        check(not (self.mixture and self.paths), "paths",
              "data.mixture names the sources: leave data.paths empty")
        names = [part.name for part in self.mixture]
        for i, part in enumerate(self.mixture):
            section = f"data.mixture[{i}]"
            _check(bool(part.name) and names.index(part.name) == i, "name", part.name,
                   "must be a non-empty name no earlier source of the mixture has", section)
            _check(part.weight > 0, "weight", part.weight, "must be > 0", section)
            _check_source(part, section)
        check(0 < self.validation_percent < 100, "validation_percent", "must be in (0, 100)")
        check(self.seq_len >= 2, "seq_len", "must be >= 2")
        check(self.tokenizer_vocab_size >= 258, "tokenizer_vocab_size", "must be >= 258")
        check(self.num_threads >= 0, "num_threads", "must be >= 0")
        check(self.prefetch >= 0, "prefetch", "must be >= 0")


SCHEDULES = ("cosine", "step", "constant")
TABLE_OPTIMIZERS = ("adam", "sparse_adam")
RESUME_POLICIES = ("auto", "allow", "must", "never")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation and the run.

    Attributes:
      steps: optimiser steps.
      batch_size: global sequences per step (split over processes and the batch mesh axes).
      grad_accum: micro-batches per step (batch_size must divide by it).
      learning_rate: peak learning rate of the backbone (AdamW).
      engram_lr_multiplier: Engram table rows use Adam at this multiple of it, no weight decay.
      table_optimizer: the Engram tables' Adam: "adam" (dense: every row's moments and value
        every step, from a table-sized gradient) or "sparse_adam" (lazy: only the rows the step
        touched, from the gradient of the gathered rows; `engram_jax.train.sparse_adam`).
      warmup_steps: linear warm-up; then `schedule` ("cosine" to min_lr_ratio, "step": x0.1 at
        80% and 90% of the run, or "constant").
      weight_decay: AdamW decay of the backbone's matrices (not norms, biases or gates).
      b1, b2: Adam moments.
      clip_norm: global gradient-norm clip (0 disables).
      seed: parameter init and data order.
      log_every, eval_every, eval_batches: metrics and validation intervals (steps).
      checkpoint_every, keep_checkpoints: asynchronous checkpoint interval and retention.
      run_dir: where checkpoints, metrics.jsonl, TensorBoard events and plots go.
      resume: what a run directory that holds checkpoints means: "auto" continues it when the
        config is the same but for the settings that are safe to change (steps, logging,
        evaluation, checkpoint interval; `engram_jax.train.run_dir.SAFE_ON_RESUME`) and refuses
        it otherwise; "allow" continues it even so; "must" also refuses to start a new run;
        "never" refuses to continue one.
      peak_flops: per-device peak FLOP/s for the MFU estimate; None picks a known value for the
        device kind (none for CPUs, so no MFU is reported there).
    """

    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    learning_rate: float = 3e-3
    engram_lr_multiplier: float = 5.0
    table_optimizer: str = "adam"
    warmup_steps: int = 30
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    run_dir: str = "runs/small"
    resume: str = "auto"
    peak_flops: float | None = None

    def __post_init__(self):
        check = lambda ok, field, why: _check(ok, field, getattr(self, field), why, "train")
        for field in ("steps", "batch_size", "grad_accum", "log_every", "eval_every",
                      "eval_batches", "checkpoint_every", "keep_checkpoints"):
            check(getattr(self, field) >= 1, field, "must be >= 1")
        check(self.batch_size % self.grad_accum == 0, "batch_size",
              f"must be divisible by grad_accum={self.grad_accum}")
        check(self.learning_rate > 0, "learning_rate", "must be > 0")
        check(self.engram_lr_multiplier > 0, "engram_lr_multiplier", "must be > 0")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(self.clip_norm >= 0, "clip_norm", "must be >= 0 (0 disables)")
        check(self.resume in RESUME_POLICIES, "resume", f"must be one of {RESUME_POLICIES}")
        check(self.table_optimizer in TABLE_OPTIMIZERS, "table_optimizer",
              f"must be one of {TABLE_OPTIMIZERS}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run needs; `load_config` reads it from a YAML preset."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sharding: ShardingConfig = dataclasses.field(default_factory=ShardingConfig)

    def __post_init__(self):
        _check(self.model.attention != "splash" or self.data.seq_len % 128 == 0, "attention",
               self.model.attention, f"needs data.seq_len a multiple of 128 (the splash "
               f"kernel's block), got {self.data.seq_len}", "model")
        engram = self.model.engram
        _check(engram is None or engram.table_placement != "host"
               or self.train.table_optimizer == "sparse_adam", "table_placement",
               getattr(engram, "table_placement", None), "host tables are trained by lazy Adam "
               f"on the host: needs train.table_optimizer=sparse_adam, got "
               f"{self.train.table_optimizer!r}", "model.engram")
