"""Documents for training: the embedded default corpus and other sources, with a fixed split.

Every document has a key (its path below the pattern's fixed directory, with :line or :index
for records) and goes to the validation split when a hash of the key falls under
`validation_percent`, so the split never depends on the order of reading, on other documents
or on where the corpus lives. A corpus of one document (one text file) is split by lines
instead: its last `validation_percent` of bytes, at a line boundary, are the validation split.

Files are read a document (a JSONL line, a Parquet batch) at a time, so a source's size is not
bounded by memory. Bad input is reported, never silently trained on: a record that is null, not a string, empty or
not valid JSON is skipped and counted (`CorpusReport`), undecodable bytes of a text file are
replaced by U+FFFD and counted, and a missing path, field or column, or a source with nothing
usable, is a `DataError` (or `FileNotFoundError`) whose one-line message names the file or field.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import json
import pathlib
import sysconfig
import threading
from collections.abc import Iterator

from engram_jax.config.schema import DataConfig

_EXCLUDED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__",
                         "idle_test", "lib2to3"}


class DataError(ValueError):
    """The corpus cannot be used as configured; the message names the file, field or key."""


@dataclasses.dataclass
class CorpusReport:
    """What reading the corpus found: documents kept, records skipped by reason, bytes replaced."""

    documents: int = 0
    empty_skipped: int = 0
    null_skipped: int = 0
    non_string_skipped: int = 0
    invalid_json_skipped: int = 0
    replaced_bytes: int = 0
    text_bytes: int = 0

    @property
    def skipped(self) -> int:
        return (self.empty_skipped + self.null_skipped + self.non_string_skipped
                + self.invalid_json_skipped)

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for n, why in (
            (self.empty_skipped, "empty"), (self.null_skipped, "null"),
            (self.non_string_skipped, "not text"), (self.invalid_json_skipped, "not valid JSON"))
            if n) or "none"
        return (f"{self.documents} documents ({self.text_bytes / 2**20:.1f} MiB); records "
                f"skipped: {skipped}; {self.replaced_bytes} undecodable bytes replaced by U+FFFD")

    def metrics(self) -> dict[str, int]:
        """The counts as metrics (`data/...`), for the run's metrics.jsonl."""
        return {f"data/{k}": v for k, v in dataclasses.asdict(self).items()}


_counter = threading.local()


def _count_and_replace(error: UnicodeDecodeError):
    _counter.value = getattr(_counter, "value", 0) + (error.end - error.start)
    return "\ufffd", error.end


codecs.register_error("engram_jax_count", _count_and_replace)


def decode(data: bytes, report: CorpusReport) -> str:
    """UTF-8 text of `data`, undecodable bytes replaced and counted in `report`."""
    _counter.value = 0
    text = data.decode("utf-8", errors="engram_jax_count")
    report.replaced_bytes += _counter.value
    return text


def in_validation(key: str, percent: float) -> bool:
    """Whether the document `key` belongs to the validation split (a fixed hash of the key)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8],
                            "little") % 1_000_000
    return bucket < percent * 10_000


def stdlib_files() -> tuple[pathlib.Path, list[pathlib.Path]]:
    """The running interpreter's standard-library sources (tests and site-packages excluded)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py"))
             if not _EXCLUDED_STDLIB_DIRS & set(p.relative_to(root).parts[:-1])]
    return root, files


def expand_paths(patterns: tuple[str, ...]) -> list[tuple[pathlib.Path, str]]:
    """(file, key) of the files named by paths or globs, sorted; a pattern that matches nothing
    is an error. The key is the file's path below the pattern's fixed part (`a/*.txt` gives
    `doc.txt`; a file path gives its name), so a corpus keeps its split wherever it lives."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else (
            [pattern] if pathlib.Path(pattern).exists() else [])
        if not matches:
            raise FileNotFoundError(f"data.paths: {pattern!r} does not exist or matches no file")
        parts = pathlib.Path(pattern).parts
        fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
        root = pathlib.Path(*parts[:fixed]) if fixed else pathlib.Path(".")
        files += [(pathlib.Path(m), str(pathlib.Path(m).relative_to(root))) for m in matches
                  if pathlib.Path(m).is_file()]
    return files


def iter_documents(config: DataConfig, report: CorpusReport) -> Iterator[tuple[str, str]]:
    """(key, text) of every usable document of the source, in a fixed order; the others are
    counted in `report` by reason."""
    for key, text in _raw_documents(config, report):
        if text is None:
            report.null_skipped += 1
        elif not isinstance(text, str):
            report.non_string_skipped += 1
        elif not text.strip():
            report.empty_skipped += 1
        else:
            report.documents += 1
            report.text_bytes += len(text.encode("utf-8", "surrogatepass"))
            yield key, text


_INVALID = object()  # a record that is not valid JSON


def _raw_documents(config: DataConfig, report: CorpusReport) -> Iterator[tuple[str, object]]:
    """(key, value) of every record; the value may be None, not a string, or empty."""
    if config.source == "stdlib":
        root, files = stdlib_files()
        for path in files:
            yield str(path.relative_to(root)), decode(path.read_bytes(), report)
    elif config.source == "text":
        for path, key in expand_paths(config.paths):
            yield key, decode(path.read_bytes(), report)
    elif config.source == "jsonl":
        for path, key in expand_paths(config.paths):
            for number, line in _numbered_lines(path):
                if not line.strip():
                    continue
                try:
                    record = json.loads(decode(line, report))
                except json.JSONDecodeError:
                    report.invalid_json_skipped += 1
                    continue
                if not isinstance(record, dict) or config.field not in record:
                    raise DataError(f"{path}:{number}: no field {config.field!r} "
                                    "(set data.field)")
                yield f"{key}:{number}", record[config.field]
    elif config.source == "parquet":
        import pyarrow.parquet as pq

        for path, key in expand_paths(config.paths):
            table = pq.ParquetFile(path)
            if config.field not in table.schema_arrow.names:
                raise DataError(f"{path}: no column {config.field!r} (columns: "
                                f"{', '.join(table.schema_arrow.names)}; set data.field)")
            values = (value for batch in table.iter_batches(columns=[config.field])
                      for value in batch.column(0).to_pylist())
            for index, value in enumerate(values):
                yield f"{key}:{index}", value
    elif config.source == "hf":
        try:
            import datasets
        except ImportError as err:
            raise DataError("data.source 'hf' needs the `datasets` package") from err
        # Streamed: records arrive as they are read, with no copy of the dataset on disk or
        # in memory, so a corpus larger than either can be pre-tokenised.
        dataset = datasets.load_dataset(config.hf_name, split=config.hf_split, streaming=True)
        for index, record in enumerate(dataset):
            if config.field not in record:
                raise DataError(f"{config.hf_name}: record {index} has no column "
                                f"{config.field!r} (columns: {', '.join(record)}; set "
                                "data.field)")
            yield f"{config.hf_name}:{index}", record[config.field]
    else:
        raise DataError(f"data.source {config.source!r} has no documents (array_record holds "
                        "pre-tokenised sequences)")


def _numbered_lines(path: pathlib.Path) -> Iterator[tuple[int, bytes]]:
    """(number from 1, line) of a file, read a line at a time, numbered as
    `bytes.splitlines` of the whole file would number them."""
    number = 0
    with open(path, "rb") as f:
        for chunk in f:
            for line in chunk.splitlines():
                number += 1
                yield number, line


def split_by_lines(text: str, percent: float) -> tuple[str, str]:
    """(first lines, last lines) of one document, the last ones about `percent` of its bytes,
    cut at a line boundary; either part may be empty when the text has too few lines."""
    lines = text.splitlines(keepends=True)
    target = len(text.encode("utf-8", "surrogatepass")) * (1 - percent / 100)
    position, cut = 0, len(lines)
    for index, line in enumerate(lines):
        if position >= target:
            cut = index
            break
        position += len(line.encode("utf-8", "surrogatepass"))
    return "".join(lines[:cut]), "".join(lines[cut:])


def split_documents(config: DataConfig) -> tuple[list[str], list[str], CorpusReport]:
    """(train texts, validation texts, report): by a hash of each document's key, or by lines
    when the corpus is one document.

    Raises:
      DataError: nothing usable was read, or the split leaves one side empty.
    """
    report = CorpusReport()
    train, validation = [], []
    for key, text in iter_documents(config, report):
        (validation if in_validation(key, config.validation_percent) else train).append(text)
    where = ", ".join(config.paths) if config.paths else (config.hf_name or config.source)
    if report.documents == 0:
        raise DataError(f"data: {where} holds no usable document (records skipped: "
                        f"{report.skipped}; {report.summary()})")
    if report.documents == 1:
        head, tail = split_by_lines((train + validation)[0], config.validation_percent)
        train, validation = [t for t in [head] if t.strip()], [t for t in [tail] if t.strip()]
    if not train or not validation:
        raise DataError(f"data: the split of {where} left {len(train)} training and "
                        f"{len(validation)} validation documents ({report.summary()}); add "
                        "documents or raise data.validation_percent")
    return train, validation, report
