"""The input pipeline: from windows of seq_len + 1 tokens to batches with their hash ids.

The windows (`engram_jax.data.prepare`: an in-memory stream's `Windows` or a pre-tokenised
corpus's `shards.RecordWindows`) are addressed by index. A grain `MapDataset` shuffles the
indices from the seed (a new order each epoch) and groups them into per-process batches of
global_batch / process_count consecutive indices; process p takes every process_count-th of
those groups from the p-th, so its rows are the p-th slice of each global batch and the windows
of other processes' rows are never read. Its worker threads then read the windows and compute
the Engram hash ids on the host, so the device never hashes and never waits for it. The
iterator's state is a small dict that checkpoints save; after a restore the next batch is the
one that would have come.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import grain
import jax
import numpy as np

from engram_jax.config.schema import Config, EngramConfig
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.data.corpus import DataError
from engram_jax.data.hashing import NgramHasher, segment_ids_from_separator
from engram_jax.data.prepare import PreparedData, Windows
from engram_jax.data.shards import RecordWindows
from engram_jax.data.tokenizer import TextTokenizer


def _tagged(source: int, index: int) -> tuple[int, int]:
    return source, index


class _ReadWindows(grain.transforms.Map):
    """(int (b,) sources, int (b,) window indices) -> int32 (b, L + 1) windows."""

    def __init__(self, sources: list[Windows | RecordWindows]):
        self.sources = sources

    def map(self, batch: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        sources, indices = batch
        if len(self.sources) == 1:
            return self.sources[0].read(indices)
        out = np.empty((len(indices), self.sources[0].seq_len + 1), np.int32)
        for source in np.unique(sources):
            rows = np.flatnonzero(sources == source)
            out[rows] = self.sources[source].read(indices[rows])
        return out


class _AddHashIds(grain.transforms.Map):
    """tokens (b, L + 1) -> {"tokens": int32 (b, L + 1), "hash_ids": {layer: int32 (b, L, K)}}
    and, given the separator, "segment_ids": int32 (b, L) of the inputs."""

    def __init__(self, hasher: NgramHasher | None, separator_id: int | None):
        self.hasher = hasher
        self.separator_id = separator_id

    def map(self, tokens: np.ndarray) -> dict:
        tokens = np.asarray(tokens, dtype=np.int32)
        hash_ids = self.hasher(tokens[:, :-1]) if self.hasher is not None else {}
        batch = {"tokens": tokens, "hash_ids": hash_ids}
        if self.separator_id is not None:
            batch["segment_ids"] = segment_ids_from_separator(tokens[:, :-1], self.separator_id)
        return batch


def make_hasher(config: Config, tokenizer: TextTokenizer, eod_id: int) -> NgramHasher | None:
    """The Engram hasher of `config` for a tokenizer (`engram_hasher` with the model's Engram
    settings and `data.document_mask`); None without Engram."""
    return engram_hasher(config.model.engram, tokenizer, eod_id, config.data.document_mask)


def engram_hasher(engram: EngramConfig | None, tokenizer: TextTokenizer, eod_id: int,
                  document_mask: bool = False) -> NgramHasher | None:
    """The hasher of Engram settings for a tokenizer: compression on or off as configured,
    hashes reset at document boundaries with `engram.reset_at_document_boundary` or
    `document_mask`; None for no Engram."""
    if engram is None:
        return None
    if document_mask:
        engram = dataclasses.replace(engram, reset_at_document_boundary=True)
    compressor = (CompressedTokenizer.from_tokenizer(tokenizer) if engram.tokenizer_compression
                  else CompressedTokenizer.identity(len(tokenizer)))
    return NgramHasher(engram, compressor, separator_id=eod_id)


def batches(windows: Windows | RecordWindows | Sequence[tuple[Windows | RecordWindows, float]],
            global_batch: int, hasher: NgramHasher | None, seed: int, process_index: int = 0,
            process_count: int = 1, shuffle: bool = True, repeat: bool = True,
            num_threads: int = 2, prefetch: int = 4,
            separator_id: int | None = None) -> grain.IterDataset:
    """Batches of this process from `windows` (`len`, `read(indices)` -> int32 (n, L + 1)), or
    from a mixture: (windows, weight) pairs, each shuffled on its own (seed + its position) and
    repeated, drawn in proportion to the weights (grain's `MapDataset.mix`). Dicts of "tokens"
    (b, L + 1), "hash_ids" {layer: (b, L, K)} and, with `separator_id` (the token ending each
    document), "segment_ids" (b, L); b = global_batch / process_count. Every process sees its
    rows of the same global batches and reads no other window."""
    if global_batch % process_count:
        raise ValueError(f"train.batch_size={global_batch} must be divisible by the "
                         f"{process_count} processes")
    sources = list(windows) if isinstance(windows, Sequence) else [(windows, 1.0)]
    if len(sources) > 1 and not repeat:
        raise ValueError("a mixture is drawn from repeated sources: repeat must be True")
    for source, _ in sources:
        if len(source) < global_batch:
            raise DataError(f"{len(source)} sequences of {source.seq_len + 1} tokens are fewer "
                            f"than one batch of train.batch_size={global_batch}")
    parts = []
    for position, (source, _) in enumerate(sources):
        part = grain.MapDataset.range(len(source))
        if shuffle:
            part = part.shuffle(seed=seed + position)
        if repeat:
            part = part.repeat(None)
        parts.append(part.map(functools.partial(_tagged, position)))
    dataset = (parts[0] if len(parts) == 1 else
               grain.MapDataset.mix(parts, [weight for _, weight in sources]))
    rows = global_batch // process_count
    dataset = dataset.batch(rows, drop_remainder=True)
    if not repeat:  # whole global batches only
        dataset = dataset[:len(dataset) // process_count * process_count]
    dataset = dataset[process_index::process_count]
    dataset = dataset.map(_ReadWindows([source for source, _ in sources])).map(
        _AddHashIds(hasher, separator_id))
    return dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                     prefetch_buffer_size=prefetch))


def unigram_cross_entropy(train_counts: np.ndarray, validation_counts: np.ndarray) -> float:
    """Validation cross-entropy (nats/token) of the add-one-smoothed training unigram model,
    from the splits' token counts (int (vocab,))."""
    counts = train_counts.astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-(validation_counts * log_probs).sum() / validation_counts.sum())


def training_batches(config: Config, prepared: PreparedData, hasher: NgramHasher | None
                     ) -> tuple[grain.IterDataset, dict[str, grain.IterDataset]]:
    """This process's training batches (shuffled, repeated, from `train.seed`; a mixture's
    sources drawn by weight) and, per source ("" for a lone one), its validation batches: a
    fixed sample spread over the whole split (shuffled with seed 0, not repeated), so every
    evaluation sees the same `train.eval_batches` batches."""
    common = dict(global_batch=config.train.batch_size, hasher=hasher,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  num_threads=config.data.num_threads, prefetch=config.data.prefetch,
                  separator_id=prepared.eod_id if config.data.document_mask else None)
    train = (batches([(part.train, part.weight) for part in prepared.parts],
                     seed=config.train.seed, **common) if prepared.is_mixture else
             batches(prepared.train, seed=config.train.seed, **common))
    return train, {part.name: batches(part.validation, seed=0, repeat=False, **common)
                   for part in prepared.parts}
