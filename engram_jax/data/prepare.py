"""From a corpus to the windows training reads: read, split, train or load the tokenizer,
tokenise (cached), or open a pre-tokenised corpus.

Documents are tokenised in batches and concatenated, each followed by the end-of-document token,
into one int32 stream per split, cached on disk and keyed by the documents and the tokenizer, and
cut into windows (`Windows`). A pre-tokenised source (`data.source: array_record`, written by
`python -m engram_jax.pretokenize`) is opened for random access instead (`shards.RecordWindows`):
nothing is read whole. Both give `PreparedData`; `engram_jax.data.pipeline` turns its windows
into batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from engram_jax.config.schema import DataConfig, MixtureSource
from engram_jax.data import shards
from engram_jax.data.corpus import CorpusReport, DataError, split_documents
from engram_jax.data.tokenizer import (DEFAULT_SPECIAL_TOKENS, TextTokenizer,
                                       cached_bpe_tokenizer, default_cache_dir, load_tokenizer)

EOD_TOKEN = DEFAULT_SPECIAL_TOKENS[0]  # the offline default tokenizer's
_ENCODE_CHUNK = 256


class Windows:
    """Random access to the windows of an in-memory int32 token stream: window i is
    stream[i * seq_len : i * seq_len + seq_len + 1] (inputs and shifted targets)."""

    def __init__(self, stream: np.ndarray, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self.count = max(0, (len(stream) - 1) // seq_len)
        self.tokens = len(stream)  # of the stream, the tokens after the last window included

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> np.ndarray:
        start = int(index) * self.seq_len
        return self.stream[start:start + self.seq_len + 1]

    def read(self, indices) -> np.ndarray:
        """int32 (n, seq_len + 1): windows `indices`."""
        return np.stack([self[i] for i in indices]).astype(np.int32)

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """int64 (vocab_size,) count of every token id of the stream."""
        return np.bincount(self.stream, minlength=vocab_size).astype(np.int64)

    def fingerprint(self) -> dict:
        """The stream's length and sha256 (what a resumed run checks)."""
        digest = hashlib.sha256(np.ascontiguousarray(self.stream, "<i4").tobytes())
        return {"tokens": int(len(self.stream)), "sha256": digest.hexdigest()[:16]}


@dataclasses.dataclass
class DataPart:
    """One source's splits: windows (`Windows` or `shards.RecordWindows`: `len`, `[i]` -> int32
    (seq_len + 1,), `read(indices)` -> (n, seq_len + 1), `fingerprint()`, `token_counts(vocab)`)
    and what reading it found. `name`
    is the mixture's name for it ("" for a lone source), `weight` its share of training."""

    name: str
    weight: float
    train: Windows | shards.RecordWindows
    validation: Windows | shards.RecordWindows
    report: CorpusReport


@dataclasses.dataclass
class PreparedData:
    """The tokenizer, the end-of-document id and the sources' splits: one `DataPart`, or one
    per source of `data.mixture`."""

    tokenizer: TextTokenizer
    eod_id: int
    parts: tuple[DataPart, ...]

    @property
    def is_mixture(self) -> bool:
        return bool(self.parts[0].name)

    def _lone(self) -> DataPart:
        if self.is_mixture:
            raise ValueError("a mixture has one train and validation split per source: read "
                             "`parts`")
        return self.parts[0]

    @property
    def train(self) -> Windows | shards.RecordWindows:
        """The lone source's training windows."""
        return self._lone().train

    @property
    def validation(self) -> Windows | shards.RecordWindows:
        """The lone source's validation windows."""
        return self._lone().validation

    @property
    def report(self) -> CorpusReport:
        """What reading every source found, summed."""
        reports = [dataclasses.asdict(part.report) for part in self.parts]
        return CorpusReport(**{key: sum(r[key] for r in reports) for key in reports[0]})


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
    default BPE is trained once and cached; tokenising is cached too), into windows of
    `config.seq_len` + 1 tokens; a pre-tokenised source (`array_record`) is opened instead. With
    `data.mixture` every source is prepared so, with one tokenizer: `tokenizer`, else the
    configured one, else the first source's.

    Raises:
      DataError, FileNotFoundError: the corpus cannot be used (the message names what).
    """
    if not config.mixture:
        tokenizer, eod_id, part = _prepare_source(config, "", 1.0, progress, tokenizer,
                                                  "the run's", "data.paths")
        return PreparedData(tokenizer, eod_id, (part,))
    parts, first = [], None
    for index, (source, settings) in enumerate(_mixture_sources(config)):
        chosen, eod_id, part = _prepare_source(
            settings, source.name, source.weight, progress, tokenizer,
            f"the mixture's (from source {first!r})" if first else "the run's",
            f"data.mixture[{index}] ({source.name!r})")
        if parts and eod_id != parts[0][0]:
            raise DataError(f"data.mixture: source {source.name!r} ends its documents with id "
                            f"{eod_id}, source {first!r} with {parts[0][0]}")
        tokenizer, first = chosen, first or source.name
        parts.append((eod_id, part))
    return PreparedData(tokenizer, parts[0][0], tuple(part for _, part in parts))


def _mixture_sources(config: DataConfig) -> list[tuple[MixtureSource, DataConfig]]:
    """Each source of `config.mixture` with the data settings that read it alone."""
    return [(source, dataclasses.replace(
        config, source=source.source, paths=source.paths, field=source.field,
        hf_name=source.hf_name, hf_split=source.hf_split, mixture=()))
        for source in config.mixture]


def _prepare_source(config: DataConfig, name: str, weight: float, progress: bool,
                    tokenizer: TextTokenizer | None, whose: str, where: str
                    ) -> tuple[TextTokenizer, int, DataPart]:
    """(tokenizer, end-of-document id, the source's part) of one source (`config` without a
    mixture); `whose` names `tokenizer` and `where` the source's setting in an error."""
    if config.source == "array_record":
        return _pretokenized(config, name, weight, tokenizer, whose, where)
    train_texts, validation_texts, report = split_documents(config)
    cache = pathlib.Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    if tokenizer is None and config.tokenizer is None:
        tokenizer = cached_bpe_tokenizer(train_texts, config.tokenizer_vocab_size, cache)
    elif tokenizer is None:
        tokenizer = load_tokenizer(config.tokenizer)
    eod_id = end_of_document_id(tokenizer, config.eod_token)
    streams = cache / "tokens"
    label = f" {name}" if name else ""
    train = _cached_stream(streams, tokenizer, train_texts, eod_id, progress,
                           f"tokenising{label} train")
    validation = _cached_stream(streams, tokenizer, validation_texts, eod_id, progress,
                                f"tokenising{label} validation")
    return tokenizer, eod_id, DataPart(name, weight, Windows(train, config.seq_len),
                                       Windows(validation, config.seq_len), report)


def data_fingerprint(prepared: PreparedData) -> dict:
    """What identifies the tokens a run trains and validates on: the splits' sizes and digests
    (per source of a mixture), and the documents read."""
    def of(part: DataPart) -> dict:
        train, validation = part.train.fingerprint(), part.validation.fingerprint()
        return {"train_tokens": train["tokens"], "validation_tokens": validation["tokens"],
                "train_sha256": train["sha256"], "validation_sha256": validation["sha256"]}

    if not prepared.is_mixture:
        return {"documents": prepared.report.documents, **of(prepared.parts[0])}
    return {"documents": prepared.report.documents,
            "mixture": {part.name: {"weight": part.weight, **of(part)}
                        for part in prepared.parts}}


def _pretokenized(config: DataConfig, name: str, weight: float,
                  tokenizer: TextTokenizer | None, whose: str, where: str
                  ) -> tuple[TextTokenizer, int, DataPart]:
    """The corpus directory `config.paths[0]` (`shards.open_corpus`; `where` names its setting
    in errors): its tokenizer must be `tokenizer` and the configured one, when given."""
    if len(config.paths) != 1:
        raise DataError(f"{where}: source array_record reads one corpus directory, got "
                        f"{len(config.paths)}: {', '.join(config.paths)}")
    directory = pathlib.Path(config.paths[0])
    corpus = shards.open_corpus(directory, config.seq_len, where)
    for label, expected in ((whose, tokenizer),
                            (f"data.tokenizer={config.tokenizer!r}",
                             load_tokenizer(config.tokenizer) if config.tokenizer else None)):
        if expected is not None and expected.fingerprint() != corpus.tokenizer.fingerprint():
            raise DataError(f"{where}: {directory} was tokenised with another tokenizer than "
                            f"{label}")
    return corpus.tokenizer, corpus.meta["eod_id"], DataPart(
        name, weight, corpus.train, corpus.validation, CorpusReport(**corpus.meta["report"]))


def validation_windows(config: DataConfig, tokenizer: TextTokenizer
                       ) -> tuple[list[tuple[str, float, Windows | shards.RecordWindows]], int]:
    """Per source ("" for a lone one) of `config`, (name, weight, validation windows) with
    `tokenizer`, tokenising only the validation splits (a pre-tokenised source's must have been
    made with it), and the documents read.

    Raises:
      DataError, FileNotFoundError: as `prepare_data`.
    """
    sources = ([("", 1.0, config, "data.paths")] if not config.mixture else
               [(source.name, source.weight, settings, f"data.mixture[{i}] ({source.name!r})")
                for i, (source, settings) in enumerate(_mixture_sources(config))])
    out, documents = [], 0
    for name, weight, settings, where in sources:
        if settings.source == "array_record":
            _, _, part = _pretokenized(settings, name, weight, tokenizer, "the checkpoint's",
                                       where)
            windows, read = part.validation, part.report.documents
        else:
            stream, read = validation_stream(settings, tokenizer)
            windows = Windows(stream, settings.seq_len)
        out.append((name, weight, windows))
        documents += read
    return out, documents


def validation_stream(config: DataConfig, tokenizer: TextTokenizer) -> tuple[np.ndarray, int]:
    """The validation split of `config` tokenised with `tokenizer` (documents joined by the
    end-of-document token): (token stream, number of documents read)."""
    _, texts, report = split_documents(config)
    stream = tokenize_stream(tokenizer, texts, end_of_document_id(tokenizer, config.eod_token))
    return stream, report.documents
