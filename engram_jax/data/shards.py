"""Pre-tokenised corpora as ArrayRecord shards: the format, its incremental writer and its
random-access reader.

A corpus directory (`python -m engram_jax.pretokenize` writes it):

  train-00000.array_record, ...   the training split's records, shard by shard
  train-00000.json, ...           a finished shard's sidecar: its records, bytes and sha256, and
                                  where the split's stream stood after it (to resume a run)
  train-00000.counts.npy, ...     the split's token counts through that shard (int64, vocab)
  train.counts.npy                the finished split's token counts
  validation-00000.array_record, ...   the same for the validation split
  tokenizer/                      the tokenizer the ids come from
  settings.json                   what the corpus is made from (source, split, tokenizer,
                                  seq_len), written first: a rerun with other settings is refused
  meta.json                       written last, when every shard is finished (its absence marks
                                  an unfinished corpus): format, seq_len, end-of-document id,
                                  tokenizer digest, per split its shards, records, tokens and
                                  documents, and the corpus report

A record is one window of seq_len + 1 little-endian int32 tokens: the inputs and the shifted
targets of one training sequence. Window i of a split starts at token i x seq_len of the split's
packed stream (its documents in the source's order, each followed by the end-of-document token),
so consecutive windows share one token, as `data.prepare.Windows` cuts an in-memory stream; the
tokens after the last whole window are left out. A shard is closed at the first document end
after it holds `shard_records` records, so a shard boundary is a document boundary of the
source and the sidecar's state (the next document and the < seq_len + 1 tokens not yet in a
window) is enough to go on from there.

Training reads a split through `RecordWindows` (random access by window index through
`ArrayRecordReader`, nothing read whole); `open_corpus` checks the directory first and names the file of
any problem (missing, truncated, another format, tokenizer or sequence length).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
import threading

import numpy as np

from engram_jax.data.corpus import DataError

FORMAT = 2
META_FILE = "meta.json"
SETTINGS_FILE = "settings.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "validation")
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access reads one window
READER_OPTIONS = "readahead_buffer_size:0"
COUNT_EVERY_TOKENS = 1 << 20


def shard_path(directory: pathlib.Path, split: str, index: int, suffix: str) -> pathlib.Path:
    """`<split>-<index>.<suffix>` in `directory` (suffix "array_record", "json", "counts.npy")."""
    return directory / f"{split}-{index:05d}.{suffix}"


def counts_path(directory: pathlib.Path, split: str) -> pathlib.Path:
    """`<split>.counts.npy`: the finished split's token counts, int64 (vocab,)."""
    return directory / f"{split}.counts.npy"


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    staging = path.with_name(path.name + ".partial")
    staging.write_bytes(data)
    staging.rename(path)


def _sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class SplitState:
    """Where one split's stream stands: after `shards` finished shards holding `records`
    windows, `tokens` tokens and `documents` documents, with the source read up to (not
    including) document `next_document`; `pending` int32 are the tokens not yet in a whole
    window (fewer than seq_len + 1) and `counts` int64 (vocab,) the split's token counts."""

    shards: int = 0
    records: int = 0
    tokens: int = 0
    documents: int = 0
    next_document: int = 0
    pending: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    counts: np.ndarray | None = None


class SplitWriter:
    """Appends the documents of one split to its shards, window by window (`add`), closes a
    shard at the first document end after `shard_records` records (with its sidecar and counts,
    so that a later run can go on from there) and the last one at `finish`."""

    def __init__(self, directory: pathlib.Path, split: str, seq_len: int, vocab_size: int,
                 shard_records: int, state: SplitState | None = None):
        self.directory, self.split, self.seq_len = directory, split, seq_len
        self.shard_records = max(1, shard_records)
        self.state = state or SplitState()
        if self.state.counts is None:
            self.state.counts = np.zeros(vocab_size, np.int64)
        self._writer = None
        self._shard_records = 0
        self._uncounted, self._uncounted_tokens = [], 0

    def _count(self) -> None:
        """Adds the tokens appended since the last count to `state.counts` (one bincount for
        many documents: a per-document one would cost the vocabulary's size each)."""
        if self._uncounted:
            tokens = np.concatenate(self._uncounted)
            self.state.counts += np.bincount(tokens, minlength=len(self.state.counts))
            self._uncounted, self._uncounted_tokens = [], 0

    def _open(self) -> None:
        from array_record.python import array_record_module

        path = shard_path(self.directory, self.split, self.state.shards, "array_record")
        self._path = path.with_name(path.name + ".partial")
        self._writer = array_record_module.ArrayRecordWriter(str(self._path), WRITER_OPTIONS)
        self._shard_records = 0

    def add(self, document_index: int, tokens: np.ndarray) -> None:
        """Appends one document's tokens (its end-of-document token included) as document
        `document_index` of the source; closes the shard after it if the shard is full."""
        state, width = self.state, self.seq_len + 1
        tokens = np.array(tokens, np.int32)  # a copy: a view would keep its whole chunk alive
        self._uncounted.append(tokens)
        self._uncounted_tokens += len(tokens)
        if self._uncounted_tokens >= COUNT_EVERY_TOKENS:
            self._count()
        stream = np.concatenate([state.pending, tokens])
        windows = max(0, (len(stream) - 1) // self.seq_len)
        if windows and self._writer is None:
            self._open()
        for i in range(windows):
            start = i * self.seq_len
            self._writer.write(stream[start:start + width].astype("<i4").tobytes())
        state.pending = stream[windows * self.seq_len:].copy()
        self._shard_records += windows
        state.records += windows
        state.tokens += len(tokens)
        state.documents += 1
        state.next_document = document_index + 1
        if self._shard_records >= self.shard_records:
            self._close_shard()

    def _close_shard(self) -> None:
        self._count()
        self._writer.close()
        self._writer = None
        state = self.state
        path = shard_path(self.directory, self.split, state.shards, "array_record")
        self._path.rename(path)
        np.save(shard_path(self.directory, self.split, state.shards, "counts.npy"), state.counts)
        sidecar = {"records": self._shard_records, "bytes": path.stat().st_size,
                   "sha256": _sha256_file(path), "split_records": state.records,
                   "split_tokens": state.tokens, "split_documents": state.documents,
                   "next_document": state.next_document, "pending": state.pending.tolist()}
        _write_atomically(shard_path(self.directory, self.split, state.shards, "json"),
                          (json.dumps(sidecar) + "\n").encode())
        state.shards += 1

    def finish(self) -> dict:
        """Closes the last shard; returns the split's entry of `meta.json`."""
        if self._writer is not None:
            self._close_shard()
        self._count()
        with open(counts_path(self.directory, self.split).with_suffix(".partial"), "wb") as f:
            np.save(f, self.state.counts)
        counts_path(self.directory, self.split).with_suffix(".partial").rename(
            counts_path(self.directory, self.split))
        sidecars = [json.loads(shard_path(self.directory, self.split, i, "json").read_text())
                    for i in range(self.state.shards)]
        return {"shards": [{"file": shard_path(self.directory, self.split, i,
                                               "array_record").name,
                            "records": s["records"], "bytes": s["bytes"], "sha256": s["sha256"]}
                           for i, s in enumerate(sidecars)],
                "records": self.state.records, "tokens": self.state.tokens,
                "documents": self.state.documents}


def resume_state(directory: pathlib.Path, split: str) -> SplitState:
    """The state after a split's finished shards (those with a sidecar); unfinished files of the
    split (a shard without its sidecar, `.partial` files) are removed."""
    state = SplitState()
    while shard_path(directory, split, state.shards, "json").is_file():
        sidecar = json.loads(shard_path(directory, split, state.shards, "json").read_text())
        state = SplitState(state.shards + 1, sidecar["split_records"], sidecar["split_tokens"],
                           sidecar["split_documents"], sidecar["next_document"],
                           np.asarray(sidecar["pending"], np.int32))
    if state.shards:
        state.counts = np.load(shard_path(directory, split, state.shards - 1, "counts.npy"))
    for path in directory.glob(f"{split}-*"):
        index = int(path.name[len(split) + 1:].split(".")[0])
        if index >= state.shards or path.name.endswith(".partial"):
            path.unlink()
    return state


def write_json(path: pathlib.Path, value: dict) -> None:
    """`value` as indented JSON, written atomically."""
    _write_atomically(path, (json.dumps(value, indent=1) + "\n").encode())


class RecordWindows:
    """Random access to one split's windows: `[i]` -> int32 (seq_len + 1,) window i, and
    `read(indices)` -> (n, seq_len + 1), read from their shards when asked, each window by an
    `ArrayRecordReader` range read (`read(i, i + 1)`: 15 us a window here, where the reader's
    index-list read, which grain's `ArrayRecordDataSource` uses, cost time in proportion to the
    shard's records: 1.2 ms a call on a shard of 256,000). A shard's reader opens on first use,
    without read-ahead. `fingerprint()` identifies the split (tokens and a digest of its
    shards)."""

    def __init__(self, directory: pathlib.Path, split: str, entry: dict, seq_len: int):
        self.seq_len, self.entry = seq_len, entry
        self.paths = [str(directory / shard["file"]) for shard in entry["shards"]]
        self.starts = np.cumsum([0] + [shard["records"] for shard in entry["shards"]])
        self.count = entry["records"]
        self.tokens = entry["tokens"]  # of the split's stream, as `prepare.Windows.tokens`
        self.counts_path = counts_path(directory, split)
        self._readers: dict[int, object] = {}
        self._lock = threading.Lock()

    def _reader(self, shard: int):
        with self._lock:  # grain's threads share the readers
            if shard not in self._readers:
                from array_record.python import array_record_module

                self._readers[shard] = array_record_module.ArrayRecordReader(
                    self.paths[shard], READER_OPTIONS)
            return self._readers[shard]

    def __getstate__(self) -> dict:  # readers are reopened, not pickled
        state = dict(self.__dict__, _readers={})
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> np.ndarray:
        return self.read([index])[0]

    def read(self, indices) -> np.ndarray:
        """int32 (n, seq_len + 1): windows `indices`."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.count):
            raise IndexError(f"window indices must be in [0, {self.count})")
        shards = np.searchsorted(self.starts, indices, side="right") - 1
        positions = indices - self.starts[shards]
        records = [self._reader(int(shard)).read(int(position), int(position) + 1)[0]
                   for shard, position in zip(shards, positions)]
        return np.frombuffer(b"".join(records), dtype="<i4").reshape(
            len(records), self.seq_len + 1).astype(np.int32)

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """int64 (vocab_size,) count of every token id of the split's stream (from the pass
        that wrote it)."""
        counts = np.load(self.counts_path)
        return np.pad(counts, (0, max(0, vocab_size - len(counts))))[:vocab_size]

    def fingerprint(self) -> dict:
        """The split's tokens and a digest of its shards' sha256."""
        digest = hashlib.sha256("".join(s["sha256"] for s in self.entry["shards"]).encode())
        return {"tokens": self.entry["tokens"], "sha256": digest.hexdigest()[:16]}


def _check_shards(directory: pathlib.Path, split: str, entry: dict, seq_len: int,
                  where: str) -> None:
    """Every shard of a split is there, whole, and holds the records `meta.json` says, and the
    split's token counts are there."""
    from array_record.python import array_record_module

    if not counts_path(directory, split).is_file():
        raise DataError(f"{where}: {counts_path(directory, split)} is missing; rerun python -m "
                        "engram_jax.pretokenize")
    for shard in entry["shards"]:
        path = directory / shard["file"]
        if not path.is_file():
            raise DataError(f"{where}: shard {path} is missing (listed in "
                            f"{directory / META_FILE}); rerun python -m engram_jax.pretokenize")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise DataError(f"{where}: shard {path} has {size} bytes, {META_FILE} says "
                            f"{shard['bytes']}: it is truncated or was changed")
        try:
            reader = array_record_module.ArrayRecordReader(str(path))
            records = reader.num_records()
            first = reader.read([0])[0] if records else b""
            reader.close()
        except Exception as err:  # the reader's errors carry no file name
            raise DataError(f"{where}: shard {path} cannot be read: {err}") from None
        if records != shard["records"] or len(first) not in (0, 4 * (seq_len + 1)):
            raise DataError(f"{where}: shard {path} holds {records} records of "
                            f"{len(first)} bytes, {META_FILE} says {shard['records']} windows "
                            f"of {seq_len + 1} tokens")


@dataclasses.dataclass
class Corpus:
    """An opened corpus directory: its `meta.json`, tokenizer and the splits' windows."""

    meta: dict
    tokenizer: object
    train: RecordWindows
    validation: RecordWindows


def open_corpus(directory: pathlib.Path, seq_len: int, where: str = "data.paths") -> Corpus:
    """Opens a corpus directory for training at `seq_len` (`data.seq_len`), after checking it;
    `where` names the setting it came from in errors.

    Raises:
      DataError, FileNotFoundError: the directory is not a finished corpus of this format, its
        records are windows of another length, its tokenizer is not the one it was made with,
        or a shard is missing or truncated; the message names the file and what to do.
    """
    from engram_jax.data.tokenizer import load_tokenizer

    meta_path = directory / META_FILE
    if not meta_path.is_file():
        if (directory / SETTINGS_FILE).is_file():
            raise DataError(f"{where}: {directory} is not finished (no {META_FILE}): rerun "
                            f"python -m engram_jax.pretokenize with --out {directory} to "
                            "finish it")
        raise FileNotFoundError(f"{where}: {directory} has no {META_FILE}; make it with "
                                "python -m engram_jax.pretokenize")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"{where}: {meta_path} is format {meta.get('format', 1)}, this "
                        f"version reads format {FORMAT}: rerun python -m engram_jax.pretokenize")
    if meta["seq_len"] != seq_len:
        raise DataError(f"data.seq_len={seq_len}, but {directory} holds windows of "
                        f"{meta['seq_len']} + 1 tokens: set data.seq_len={meta['seq_len']} or "
                        f"rerun python -m engram_jax.pretokenize with data.seq_len={seq_len}")
    if not (directory / TOKENIZER_DIR / "tokenizer.json").is_file():
        raise DataError(f"{where}: {directory / TOKENIZER_DIR} holds no tokenizer.json; rerun "
                        "python -m engram_jax.pretokenize")
    tokenizer = load_tokenizer(directory / TOKENIZER_DIR)
    if tokenizer.fingerprint() != meta["tokenizer"]:
        raise DataError(f"{where}: the tokenizer in {directory / TOKENIZER_DIR} is not the "
                        f"one {directory}'s shards were made with ({META_FILE} names "
                        f"{meta['tokenizer']}, it is {tokenizer.fingerprint()})")
    for split in SPLITS:
        _check_shards(directory, split, meta["splits"][split], seq_len, where)
    train, validation = (RecordWindows(directory, split, meta["splits"][split], seq_len)
                         for split in SPLITS)
    return Corpus(meta, tokenizer, train, validation)


def remove_unfinished(directory: pathlib.Path) -> None:
    """Removes what a killed writer left unfinished outside the splits (`resume_state` cleans
    those): `.partial` files and a half-saved tokenizer."""
    for path in directory.glob("*.partial"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
