"""ArrayRecord shards of a tokenised corpus: writing them, and reading them back for training.

A shard directory holds `train-*.array_record` and `validation-*.array_record` (each record: a
chunk of the packed int32 token stream, documents ended by the end-of-document token),
`tokenizer/` and `meta.json`. `python -m engram_jax.pretokenize` writes one; training reads it
with `data.source=array_record 'data.paths=["DIR"]'`.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

RECORD_TOKENS = 1 << 16  # tokens per record
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"


def write_shards(stream: np.ndarray, directory: pathlib.Path, split: str,
                 shards: int = 1) -> list[pathlib.Path]:
    """Writes an int32 token stream as `shards` ArrayRecord files of RECORD_TOKENS-token records."""
    from array_record.python import array_record_module

    records = [stream[i:i + RECORD_TOKENS] for i in range(0, len(stream), RECORD_TOKENS)]
    paths = []
    for shard in range(shards):
        path = directory / f"{split}-{shard:05d}-of-{shards:05d}.array_record"
        writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
        for record in records[shard::shards]:
            writer.write(np.ascontiguousarray(record, dtype="<i4").tobytes())
        writer.close()
        paths.append(path)
    return paths


def read_shards(directory: pathlib.Path, split: str) -> np.ndarray:
    """The token stream of a split, records in their written order."""
    from array_record.python import array_record_module

    paths = sorted(directory.glob(f"{split}-*.array_record"))
    if not paths:
        raise FileNotFoundError(f"{directory} has no {split}-*.array_record shards (made by "
                                "python -m engram_jax.pretokenize)")
    per_shard = []
    for path in paths:
        reader = array_record_module.ArrayRecordReader(str(path))
        per_shard.append([np.frombuffer(r, dtype="<i4") for r in reader.read_all()])
        reader.close()
    ordered = [per_shard[i % len(paths)][i // len(paths)]
               for i in range(sum(len(s) for s in per_shard))]
    return np.concatenate(ordered).astype(np.int32)


def write_meta(directory: pathlib.Path, meta: dict) -> None:
    """Writes the directory's `meta.json` (token counts, end-of-document id, corpus report)."""
    (directory / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def read_meta(directory: pathlib.Path) -> dict:
    """The directory's `meta.json`; a directory without one is an error naming `data.paths`."""
    path = directory / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"data.paths: {directory} has no {META_FILE}; make it with "
                                "python -m engram_jax.pretokenize")
    return json.loads(path.read_text())
