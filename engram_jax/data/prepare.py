"""From a corpus to token streams: read, split, train or load the tokenizer, tokenise (cached).

Documents are tokenised in batches and concatenated, each followed by the end-of-document token,
into one int32 stream per split, cached on disk and keyed by the documents and the tokenizer. A
pre-tokenised source (`data.source: array_record`, written by `python -m engram_jax.pretokenize`)
is read back as it is. `engram_jax.data.pipeline` then turns a stream into batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from engram_jax.config.schema import DataConfig
from engram_jax.data import shards
from engram_jax.data.corpus import CorpusReport, DataError, split_documents
from engram_jax.data.tokenizer import (DEFAULT_SPECIAL_TOKENS, TextTokenizer,
                                       cached_bpe_tokenizer, default_cache_dir, load_tokenizer)

EOD_TOKEN = DEFAULT_SPECIAL_TOKENS[0]  # the offline default tokenizer's
_ENCODE_CHUNK = 256


@dataclasses.dataclass
class PreparedData:
    """Tokenised splits and what the rest of training needs to know about them."""

    tokenizer: TextTokenizer
    eod_id: int
    train_tokens: np.ndarray  # int32 stream
    validation_tokens: np.ndarray
    report: CorpusReport


def end_of_document_id(tokenizer: TextTokenizer, configured: str | None = None) -> int:
    """The id of the token that ends every document of a stream: `configured`
    (`data.eod_token`), else the tokenizer's end-of-sequence token, else `<|endoftext|>`, else
    its beginning-of-sequence token (which then separates the documents).

    Raises:
      DataError: the configured token is not in the tokenizer, or there is none of these.
    """
    if configured is not None:
        token_id = tokenizer.tokenizer.token_to_id(configured)
        if token_id is None:
            raise DataError(f"data.eod_token={configured!r} is not a token of tokenizer "
                            f"{tokenizer.name!r}")
        return token_id
    for token in (tokenizer.eos_token, EOD_TOKEN, tokenizer.bos_token):
        if token is not None and tokenizer.tokenizer.token_to_id(token) is not None:
            return tokenizer.tokenizer.token_to_id(token)
    raise DataError(f"tokenizer {tokenizer.name!r} names no end- or beginning-of-sequence token "
                    f"and has no {EOD_TOKEN!r}: set data.eod_token to the token that ends a "
                    "document")


def _texts_digest(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()[:16]


def tokenize_stream(tokenizer: TextTokenizer, texts: Sequence[str], eod_id: int,
                    progress: bool = False, desc: str = "tokenising") -> np.ndarray:
    """All texts tokenised and concatenated, each followed by `eod_id`: int32 (tokens,)."""
    from tqdm import tqdm

    pieces = []
    for start in tqdm(range(0, len(texts), _ENCODE_CHUNK), desc=desc, unit="chunk",
                      disable=not progress, leave=False):
        for ids in tokenizer.encode_batch(texts[start:start + _ENCODE_CHUNK]):
            pieces.append(np.asarray(ids + [eod_id], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


def _cached_stream(cache: pathlib.Path, tokenizer: TextTokenizer, texts: Sequence[str],
                   eod_id: int, progress: bool, desc: str) -> np.ndarray:
    key = hashlib.sha256((tokenizer.tokenizer.to_str() + f"eod={eod_id}"
                          + _texts_digest(texts)).encode())
    path = cache / f"{key.hexdigest()[:24]}.npy"
    if path.is_file():
        return np.load(path)
    stream = tokenize_stream(tokenizer, texts, eod_id, progress, desc)
    cache.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")  # processes may race
    np.save(staging, stream)
    staging.rename(path)
    return stream


def prepare_data(config: DataConfig, progress: bool = True,
                 tokenizer: TextTokenizer | None = None) -> PreparedData:
    """Reads, splits and tokenises the corpus with `tokenizer`, or with the configured one (the
    default BPE is trained once and cached; tokenising is cached too); a pre-tokenised source
    (`array_record`) is read as it is.

    Raises:
      DataError, FileNotFoundError: the corpus cannot be used (the message names what).
    """
    if config.source == "array_record":
        return _pretokenized(pathlib.Path(config.paths[0]))
    train_texts, validation_texts, report = split_documents(config)
    cache = pathlib.Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    if tokenizer is None and config.tokenizer is None:
        tokenizer = cached_bpe_tokenizer(train_texts, config.tokenizer_vocab_size, cache)
    elif tokenizer is None:
        tokenizer = load_tokenizer(config.tokenizer)
    eod_id = end_of_document_id(tokenizer, config.eod_token)
    streams = cache / "tokens"
    train = _cached_stream(streams, tokenizer, train_texts, eod_id, progress, "tokenising train")
    validation = _cached_stream(streams, tokenizer, validation_texts, eod_id, progress,
                                "tokenising validation")
    return PreparedData(tokenizer, eod_id, train, validation, report)


def data_fingerprint(prepared: PreparedData) -> dict:
    """What identifies the token streams a run trains and validates on: their sizes and
    sha256, and the documents read."""
    def digest(tokens: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(tokens, "<i4").tobytes()).hexdigest()[:16]

    return {"documents": prepared.report.documents,
            "train_tokens": int(len(prepared.train_tokens)),
            "validation_tokens": int(len(prepared.validation_tokens)),
            "train_sha256": digest(prepared.train_tokens),
            "validation_sha256": digest(prepared.validation_tokens)}


def _pretokenized(directory: pathlib.Path) -> PreparedData:
    """`PreparedData` from a directory written by `python -m engram_jax.pretokenize`."""
    meta = shards.read_meta(directory)
    return PreparedData(load_tokenizer(directory / shards.TOKENIZER_DIR), meta["eod_id"],
                        shards.read_shards(directory, "train"),
                        shards.read_shards(directory, "validation"),
                        CorpusReport(**meta["report"]))


def validation_stream(config: DataConfig, tokenizer: TextTokenizer) -> tuple[np.ndarray, int]:
    """The validation split of `config` tokenised with `tokenizer` (documents joined by the
    end-of-document token): (token stream, number of documents read)."""
    _, texts, report = split_documents(config)
    stream = tokenize_stream(tokenizer, texts, end_of_document_id(tokenizer, config.eod_token))
    return stream, report.documents
