"""Tokenise a corpus once into ArrayRecord shards, streaming:
`python -m engram_jax.pretokenize --config CONFIG --out DIR [--workers N] [--shard-mb MB]
[--tokenizer-sample-mb MB] [data.key=value ...]`.

Documents are read one at a time from the configured source (text globs, JSONL, Parquet, a
Hugging Face dataset, the embedded corpus), sent in chunks to `--workers` tokeniser processes
(a bounded number of chunks in flight, so memory does not grow with the corpus) and written in
the source's order as windows of `data.seq_len` + 1 tokens, shard after shard
(`engram_jax.data.shards` has the format). The split is the in-memory path's: by a hash of each
document's key. Without `data.tokenizer` the default byte-level BPE is trained on the first
`--tokenizer-sample-mb` MiB of training documents (the whole training split of a smaller
corpus, which gives `make train`'s tokenizer for the embedded corpus).

A rerun with the same `--out` and settings goes on after the last finished shard of each split
(the documents before it are read again but not tokenised) and gives the same bytes as a run
that was never stopped; a finished directory is left as it is; other settings are refused.
Train from the result with `data.source=array_record 'data.paths=["DIR"]'`.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import multiprocessing
import os
import pathlib
import sys
from collections.abc import Iterator

import numpy as np

from engram_jax.config import ConfigError, DataConfig, load_config
from engram_jax.data import shards
from engram_jax.data.corpus import (CorpusReport, DataError, expand_paths, in_validation,
                                    iter_documents, split_by_lines, stdlib_files)
from engram_jax.data.prepare import end_of_document_id
from engram_jax.data.tokenizer import TextTokenizer, cached_bpe_tokenizer, load_tokenizer

CHUNK_BYTES = 1 << 20  # text per task sent to a worker
IN_FLIGHT_PER_WORKER = 2


def split_stream(config: DataConfig, report: CorpusReport) -> Iterator[tuple[int, str, str]]:
    """(document index, split, text) of every usable document, in the source's order; a corpus
    of one document gives its first lines to "train" and its last to "validation", as
    `corpus.split_documents` does."""
    documents = iter_documents(config, report)
    head = list(itertools.islice(documents, 2))
    if len(head) == 1:
        parts = zip(("train", "validation"),
                    split_by_lines(head[0][1], config.validation_percent))
        yield from ((i, split, text) for i, (split, text) in enumerate(parts) if text.strip())
        return
    for index, (key, text) in enumerate(itertools.chain(head, documents)):
        yield index, ("validation" if in_validation(key, config.validation_percent)
                      else "train"), text


def _files_digest(config: DataConfig) -> str | None:
    """sha256 of the source's files (paths, sizes, modification times), None for a dataset."""
    if config.source == "hf":
        return None
    files = (stdlib_files()[1] if config.source == "stdlib" else
             [path for path, _ in expand_paths(config.paths)])
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def settings_of(config: DataConfig, shard_mb: float, tokenizer_sample_mb: float) -> dict:
    """What a corpus directory is made from, its source's files included: a rerun must match
    it to go on."""
    return {"source": config.source, "paths": list(config.paths), "field": config.field,
            "files": _files_digest(config),
            "hf_name": config.hf_name, "hf_split": config.hf_split,
            "validation_percent": config.validation_percent, "seq_len": config.seq_len,
            "tokenizer": config.tokenizer, "tokenizer_vocab_size": config.tokenizer_vocab_size,
            "tokenizer_sample_mb": tokenizer_sample_mb, "eod_token": config.eod_token,
            "shard_mb": shard_mb}


def _check_settings(out: pathlib.Path, settings: dict) -> None:
    """Records the settings of a new directory (or of one with nothing finished yet: a run
    that failed on bad input may be corrected); refuses other settings once a tokenizer or a
    shard is there."""
    path = out / shards.SETTINGS_FILE
    started = (out / shards.TOKENIZER_DIR).is_dir() or any(out.glob("*-*.json"))
    if not path.is_file() or not started:
        shards.write_json(path, settings)
        return
    before = json.loads(path.read_text())
    changed = [f"{key}: {before.get(key)!r} -> {value!r}" for key, value in settings.items()
               if before.get(key) != value]
    if changed:
        raise DataError(f"--out {out} holds a corpus made with other settings "
                        f"({'; '.join(changed)}): choose another --out, or rerun with the same "
                        "settings to finish it")


def _tokenizer(config: DataConfig, out: pathlib.Path, sample_mb: float) -> TextTokenizer:
    """The directory's tokenizer: the saved one when going on, else the configured one, else
    the default BPE trained on a sample of the training documents."""
    saved = out / shards.TOKENIZER_DIR
    if saved.is_dir():
        return load_tokenizer(saved)
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer)
    else:
        sample, size = [], 0
        for _, split, text in split_stream(config, CorpusReport()):
            if split == "train":
                sample.append(text)
                size += len(text.encode("utf-8", "surrogatepass"))
                if size >= sample_mb * 2**20:
                    break
        if not sample:
            raise DataError(f"data: {_where(config)} has no training document to train the "
                            "tokenizer on")
        tokenizer = cached_bpe_tokenizer(sample, config.tokenizer_vocab_size, config.cache_dir)
    staging = out / f"{shards.TOKENIZER_DIR}.partial"
    tokenizer.save(staging)
    staging.rename(saved)
    return load_tokenizer(saved)


def _where(config: DataConfig) -> str:
    return ", ".join(config.paths) if config.paths else (config.hf_name or config.source)


_worker_tokenizer: list = []


def _start_worker(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _worker_tokenizer[:] = [Tokenizer.from_str(tokenizer_json)]


def _encode(texts: list[str], eod_id: int, tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """The documents' ids, each followed by `eod_id`, concatenated: (int32 ids, int64 lengths)."""
    tokenizer = tokenizer or _worker_tokenizer[0]
    ids = [np.asarray(e.ids + [eod_id], np.int32)  # as `TextTokenizer.encode_batch`
           for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return np.concatenate(ids), np.asarray([len(a) for a in ids], np.int64)


def _chunks(documents: Iterator[tuple[int, str, str]]) -> Iterator[list[tuple[int, str, str]]]:
    chunk, size = [], 0
    for document in documents:
        chunk.append(document)
        size += len(document[2])
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def pretokenize(config: DataConfig, out: pathlib.Path, *, workers: int = 2,
                shard_mb: float = 256.0, tokenizer_sample_mb: float = 256.0,
                progress: bool = True) -> dict:
    """Writes (or finishes) the corpus directory `out` for `config`; returns its `meta.json`.

    Args:
      config: the data settings (source, split, tokenizer, seq_len, eod_token).
      out: the directory.
      workers: tokeniser processes (0: tokenise in this process). They are spawned, so a
        script that calls this must guard its top level with `if __name__ == "__main__":`.
      shard_mb: shard size: a shard is closed at the first document end past this many MiB of
        windows.
      tokenizer_sample_mb: training text the default BPE is trained on, without
        `config.tokenizer`.
      progress: show a progress bar (documents, tokens, MB/s of text) on stderr.

    Raises:
      DataError, FileNotFoundError: the source is missing or holds no usable document, the split
        leaves one side empty, or `out` holds a corpus made with other settings.
    """
    if config.source == "array_record":
        raise DataError("data.source is array_record: the corpus is already pre-tokenised")
    if config.mixture:
        raise DataError("data.mixture is set: pre-tokenise its sources one at a time (a "
                        "source's keys as data.source, data.paths, ...)")
    out.mkdir(parents=True, exist_ok=True)
    if (out / shards.META_FILE).is_file():
        meta = json.loads((out / shards.META_FILE).read_text())
        if meta.get("format") != shards.FORMAT:
            raise DataError(f"--out {out} holds a corpus of format {meta.get('format', 1)}: "
                            "remove it or choose another --out")
    _check_settings(out, settings_of(config, shard_mb, tokenizer_sample_mb))
    if (out / shards.META_FILE).is_file():
        return meta
    shards.remove_unfinished(out)
    tokenizer = _tokenizer(config, out, tokenizer_sample_mb)
    eod_id = end_of_document_id(tokenizer, config.eod_token)
    shard_records = max(1, int(shard_mb * 2**20) // (4 * (config.seq_len + 1)))
    writers = {split: shards.SplitWriter(out, split, config.seq_len, len(tokenizer),
                                         shard_records, shards.resume_state(out, split))
               for split in shards.SPLITS}
    report = CorpusReport()
    todo = (d for d in split_stream(config, report)
            if d[0] >= writers[d[1]].state.next_document)
    from tqdm import tqdm

    bar = tqdm(desc="pretokenising", unit="B", unit_scale=True, unit_divisor=1024,
               disable=not progress, file=sys.stderr)
    documents = tokens = 0

    def write(chunk, encoded) -> None:
        nonlocal documents, tokens
        ids, lengths = encoded
        starts = np.concatenate([[0], np.cumsum(lengths)])
        for (index, split, _), start, end in zip(chunk, starts[:-1], starts[1:]):
            writers[split].add(index, ids[start:end])
        documents += len(chunk)
        tokens += len(ids)
        bar.update(sum(len(text.encode("utf-8", "surrogatepass")) for _, _, text in chunk))
        bar.set_postfix(documents=f"{documents:,}", tokens=f"{tokens:,}", refresh=False)

    try:
        if workers == 0:
            for chunk in _chunks(todo):
                write(chunk, _encode([text for _, _, text in chunk], eod_id, tokenizer.tokenizer))
        else:
            # Spawned, not forked: the caller may hold jax's threads. The workers import only
            # this module's light dependencies (no jax).
            context = multiprocessing.get_context("spawn")
            with context.Pool(workers, _start_worker, (tokenizer.tokenizer.to_str(),)) as pool:
                in_flight = collections.deque()
                for chunk in _chunks(todo):
                    in_flight.append((chunk, pool.apply_async(
                        _encode, ([text for _, _, text in chunk], eod_id))))
                    while len(in_flight) > IN_FLIGHT_PER_WORKER * workers:
                        done, result = in_flight.popleft()
                        write(done, result.get())
                while in_flight:
                    done, result = in_flight.popleft()
                    write(done, result.get())
    finally:
        bar.close()
    if report.documents == 0:
        raise DataError(f"data: {_where(config)} holds no usable document (records skipped: "
                        f"{report.skipped}; {report.summary()})")
    splits = {split: writer.finish() for split, writer in writers.items()}
    if not splits["train"]["records"] or not splits["validation"]["records"]:
        raise DataError(f"data: the split of {_where(config)} left "
                        f"{splits['train']['records']} training and "
                        f"{splits['validation']['records']} validation windows of "
                        f"{config.seq_len + 1} tokens ({report.summary()}); add documents or "
                        "raise data.validation_percent")
    meta = {"format": shards.FORMAT, "seq_len": config.seq_len, "eod_id": eod_id,
            "tokenizer": tokenizer.fingerprint(), "vocab_size": len(tokenizer),
            "splits": splits, "report": vars(report)}
    shards.write_json(out / shards.META_FILE, meta)
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/small.yaml", help="YAML file or preset")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokeniser processes (0: in this process)")
    parser.add_argument("--shard-mb", type=float, default=256.0, help="MiB of windows per shard")
    parser.add_argument("--tokenizer-sample-mb", type=float, default=256.0,
                        help="training text the default BPE is trained on")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="data.key=value settings")
    args = parser.parse_args(argv)
    if args.workers < 0 or args.shard_mb <= 0 or args.tokenizer_sample_mb <= 0:
        print("pretokenize: --workers must be >= 0, --shard-mb and --tokenizer-sample-mb > 0",
              file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    try:
        config = load_config(args.config, args.overrides).data
        meta = pretokenize(config, out, workers=args.workers, shard_mb=args.shard_mb,
                           tokenizer_sample_mb=args.tokenizer_sample_mb,
                           progress=not args.no_progress)
    except (ConfigError, DataError, OSError, ValueError) as err:  # one line, no traceback
        print(f"pretokenize: {err}", file=sys.stderr)
        return 2
    train, validation = meta["splits"]["train"], meta["splits"]["validation"]
    print(f"{out}: {train['tokens']:,} training tokens in {train['records']:,} windows "
          f"({len(train['shards'])} shards), {validation['tokens']:,} validation tokens in "
          f"{validation['records']:,} windows; {meta['report']['documents']:,} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
