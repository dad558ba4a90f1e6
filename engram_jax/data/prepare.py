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
from engram_jax.data.corpus import CorpusReport, split_documents
from engram_jax.data.tokenizer import (DEFAULT_SPECIAL_TOKENS, TextTokenizer,
                                       cached_bpe_tokenizer, default_cache_dir, load_tokenizer)

EOD_TOKEN = DEFAULT_SPECIAL_TOKENS[0]
_ENCODE_CHUNK = 256


@dataclasses.dataclass
class PreparedData:
    """Tokenised splits and what the rest of training needs to know about them."""

    tokenizer: TextTokenizer
    eod_id: int
    train_tokens: np.ndarray  # int32 stream
    validation_tokens: np.ndarray
    validation_bytes: int  # UTF-8 bytes of the validation text (for bits per byte)
    report: CorpusReport

    @property
    def validation_bytes_per_token(self) -> float:
        return self.validation_bytes / max(1, len(self.validation_tokens))


def end_of_document_id(tokenizer: TextTokenizer) -> int:
    """The id of the token that ends every document of a stream (`EOD_TOKEN`)."""
    return tokenizer.token_id(EOD_TOKEN)


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
    key = hashlib.sha256((tokenizer.tokenizer.to_str() + _texts_digest(texts)).encode())
    path = cache / f"{key.hexdigest()[:24]}.npy"
    if path.is_file():
        return np.load(path)
    stream = tokenize_stream(tokenizer, texts, eod_id, progress, desc)
    cache.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")  # processes may race
    np.save(staging, stream)
    staging.rename(path)
    return stream


def prepare_data(config: DataConfig, progress: bool = True) -> PreparedData:
    """Reads, splits and tokenises the corpus (tokenizer training and tokenising are cached);
    a pre-tokenised source (`array_record`) is read as it is."""
    if config.source == "array_record":
        return _pretokenized(pathlib.Path(config.paths[0]))
    train_texts, validation_texts, report = split_documents(config)
    cache = pathlib.Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    if config.tokenizer is None:
        tokenizer = cached_bpe_tokenizer(train_texts, config.tokenizer_vocab_size, cache)
    else:
        tokenizer = load_tokenizer(config.tokenizer)
    eod_id = tokenizer.tokenizer.token_to_id(EOD_TOKEN)
    if eod_id is None:
        raise ValueError(f"tokenizer {tokenizer.name!r} has no {EOD_TOKEN!r} token to end "
                         "documents with")
    streams = cache / "tokens"
    train = _cached_stream(streams, tokenizer, train_texts, eod_id, progress, "tokenising train")
    validation = _cached_stream(streams, tokenizer, validation_texts, eod_id, progress,
                                "tokenising validation")
    validation_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in validation_texts)
    return PreparedData(tokenizer, eod_id, train, validation, validation_bytes, report)


def _pretokenized(directory: pathlib.Path) -> PreparedData:
    """`PreparedData` from a directory written by `python -m engram_jax.pretokenize`."""
    meta = shards.read_meta(directory)
    return PreparedData(load_tokenizer(directory / shards.TOKENIZER_DIR), meta["eod_id"],
                        shards.read_shards(directory, "train"),
                        shards.read_shards(directory, "validation"), meta["validation_bytes"],
                        CorpusReport(**meta["report"]))


def validation_stream(config: DataConfig, tokenizer: TextTokenizer
                      ) -> tuple[np.ndarray, float, int]:
    """The validation split of `config` tokenised with `tokenizer` (documents joined by the
    end-of-document token): (token stream, text bytes per token, number of documents)."""
    _, texts, report = split_documents(config)
    stream = tokenize_stream(tokenizer, texts, end_of_document_id(tokenizer))
    text_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return stream, text_bytes / len(stream), report.documents
