"""The input pipeline: from a token stream to batches with their hash ids.

A stream (`engram_jax.data.prepare`) is cut into windows of seq_len + 1 tokens (inputs and
shifted targets). A grain `MapDataset` shuffles the windows from the seed (a new order each
epoch), forms global batches, keeps this process's consecutive rows, and computes the Engram
hash ids on the host in its worker threads, so the device never hashes and never waits for it.
The iterator's state is a small dict that checkpoints save; after a restore the next batch is
the one that would have come.
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import numpy as np

from engram_jax.config.schema import Config, EngramConfig
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.data.hashing import NgramHasher, segment_ids_from_separator
from engram_jax.data.prepare import PreparedData
from engram_jax.data.tokenizer import TextTokenizer


class Windows:
    """Random-access source of packed sequences: window i is stream[i*L : i*L + L + 1]."""

    def __init__(self, stream: np.ndarray, seq_len: int):
        self.stream = stream
        self.seq_len = seq_len
        self.count = (len(stream) - 1) // seq_len
        if self.count < 1:
            raise ValueError(f"{len(stream)} tokens are too few for one sequence of "
                             f"{seq_len + 1}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return self.stream[start:start + self.seq_len + 1]


class _ProcessRows(grain.transforms.Map):
    """Keeps this process's consecutive rows of a global batch."""

    def __init__(self, process_index: int, process_count: int):
        self.process_index, self.process_count = process_index, process_count

    def map(self, batch: np.ndarray) -> np.ndarray:
        rows = batch.shape[0] // self.process_count
        return batch[self.process_index * rows:(self.process_index + 1) * rows]


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


def batches(stream: np.ndarray, seq_len: int, global_batch: int, hasher: NgramHasher | None,
            seed: int, process_index: int = 0, process_count: int = 1, shuffle: bool = True,
            repeat: bool = True, num_threads: int = 2, prefetch: int = 4,
            separator_id: int | None = None) -> grain.IterDataset:
    """Batches of this process: dicts of "tokens" (b, L + 1), "hash_ids" {layer: (b, L, K)}
    and, with `separator_id` (the token ending each document), "segment_ids" (b, L);
    b = global_batch / process_count. Every process sees the same global batches."""
    if global_batch % process_count:
        raise ValueError(f"train.batch_size={global_batch} must be divisible by the "
                         f"{process_count} processes")
    windows = Windows(stream, seq_len)
    if len(windows) < global_batch:
        raise ValueError(f"{len(stream)} tokens make {len(windows)} sequences of {seq_len + 1}, "
                         f"fewer than one batch of {global_batch}")
    dataset = grain.MapDataset.source(windows)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if repeat:
        dataset = dataset.repeat(None)
    dataset = dataset.batch(global_batch, drop_remainder=True)
    dataset = dataset.map(_ProcessRows(process_index, process_count)).map(
        _AddHashIds(hasher, separator_id))
    return dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                     prefetch_buffer_size=prefetch))


def unigram_cross_entropy(train: np.ndarray, validation: np.ndarray, vocab_size: int) -> float:
    """Validation cross-entropy (nats/token) of the add-one-smoothed training unigram model."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[validation].mean())


def training_batches(config: Config, prepared: PreparedData, hasher: NgramHasher | None
                     ) -> tuple[grain.IterDataset, grain.IterDataset]:
    """This process's training batches (shuffled, repeated, from `train.seed`) and validation
    batches: a fixed sample spread over the whole validation split (shuffled with seed 0, not
    repeated), so every evaluation sees the same `train.eval_batches` batches."""
    common = dict(seq_len=config.data.seq_len, global_batch=config.train.batch_size,
                  hasher=hasher, process_index=jax.process_index(),
                  process_count=jax.process_count(), num_threads=config.data.num_threads,
                  prefetch=config.data.prefetch,
                  separator_id=prepared.eod_id if config.data.document_mask else None)
    return (batches(prepared.train_tokens, seed=config.train.seed, **common),
            batches(prepared.validation_tokens, seed=0, repeat=False, **common))
