"""Documents for training: the embedded default corpus and other sources, with a fixed split.

Every document has a key (its path, or path:line / index) and goes to the validation split when
a hash of the key falls under `validation_percent`, so the split never depends on the order of
reading or on other documents. Bad input is reported, never silently lost: empty documents and
undecodable bytes (replaced by U+FFFD) are counted, and a missing path or field is an error that
names it.
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


@dataclasses.dataclass
class CorpusReport:
    """What reading the corpus found."""

    documents: int = 0
    empty_skipped: int = 0
    replaced_bytes: int = 0
    text_bytes: int = 0

    def summary(self) -> str:
        return (f"{self.documents} documents ({self.text_bytes / 2**20:.1f} MiB); "
                f"{self.empty_skipped} empty skipped; {self.replaced_bytes} undecodable bytes "
                "replaced by U+FFFD")


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


def expand_paths(patterns: tuple[str, ...]) -> list[pathlib.Path]:
    """Files named by paths or globs, sorted; a pattern that matches nothing is an error."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else (
            [pattern] if pathlib.Path(pattern).exists() else [])
        if not matches:
            raise FileNotFoundError(f"data.paths: {pattern!r} does not exist or matches no file")
        files += [pathlib.Path(m) for m in matches if pathlib.Path(m).is_file()]
    return files


def iter_documents(config: DataConfig, report: CorpusReport) -> Iterator[tuple[str, str]]:
    """(key, text) of every non-empty document of the source, in a fixed order."""
    for key, text in _raw_documents(config, report):
        if not text.strip():
            report.empty_skipped += 1
            continue
        report.documents += 1
        report.text_bytes += len(text.encode("utf-8", "surrogatepass"))
        yield key, text


def _raw_documents(config: DataConfig, report: CorpusReport) -> Iterator[tuple[str, str]]:
    if config.source == "stdlib":
        root, files = stdlib_files()
        for path in files:
            yield str(path.relative_to(root)), decode(path.read_bytes(), report)
    elif config.source == "text":
        for path in expand_paths(config.paths):
            yield str(path), decode(path.read_bytes(), report)
    elif config.source == "jsonl":
        for path in expand_paths(config.paths):
            for number, line in enumerate(path.read_bytes().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(decode(line, report))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
                if not isinstance(record, dict) or config.field not in record:
                    raise KeyError(f"{path}:{number}: no field {config.field!r} "
                                   "(set data.field)")
                yield f"{path}:{number}", str(record[config.field])
    elif config.source == "parquet":
        import pyarrow.parquet as pq

        for path in expand_paths(config.paths):
            table = pq.read_table(path)
            if config.field not in table.column_names:
                raise KeyError(f"{path}: no column {config.field!r} (columns: "
                               f"{', '.join(table.column_names)}; set data.field)")
            for index, text in enumerate(table.column(config.field).to_pylist()):
                yield f"{path}:{index}", text or ""
    elif config.source == "hf":
        try:
            import datasets
        except ImportError as err:
            raise ImportError("data.source 'hf' needs the `datasets` package") from err
        dataset = datasets.load_dataset(config.hf_name, split=config.hf_split)
        if config.field not in dataset.column_names:
            raise KeyError(f"{config.hf_name}: no column {config.field!r} (set data.field)")
        for index, record in enumerate(dataset):
            yield f"{config.hf_name}:{index}", record[config.field] or ""
    else:
        raise ValueError(f"data.source {config.source!r} has no documents (array_record holds "
                         "pre-tokenised sequences)")


def split_documents(config: DataConfig) -> tuple[list[str], list[str], CorpusReport]:
    """(train texts, validation texts, report)."""
    report = CorpusReport()
    train, validation = [], []
    for key, text in iter_documents(config, report):
        (validation if in_validation(key, config.validation_percent) else train).append(text)
    if not train or not validation:
        raise ValueError(f"data: the split left {len(train)} training and {len(validation)} "
                         f"validation documents ({report.summary()}); add documents or change "
                         "data.validation_percent")
    return train, validation, report
