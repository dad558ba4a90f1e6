"""Streaming pre-tokenisation into ArrayRecord shards, its resume, and reading it back for
training: the same windows as the in-memory path, each process reading only its rows, and bad
corpora named before training starts."""

import json
import pathlib

import numpy as np
import pytest

from engram_jax import pretokenize
from engram_jax.config import DataConfig, MixtureSource
from engram_jax.data import pipeline, prepare, shards
from engram_jax.data.corpus import DataError

SEQ_LEN = 16
SHARD_MB = 600 / 2**20  # about 9 windows of 17 tokens a shard: several shards per split


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for i in range(60):
        text = " ".join(rng.choice(words, size=int(rng.integers(5, 80))))
        (root / f"doc{i:02d}.txt").write_text(f"document {i}: {text}\n")
    return root


def _config(corpus_dir, cache, **changes):
    settings = dict(source="text", paths=(f"{corpus_dir}/*.txt",), cache_dir=str(cache),
                    tokenizer_vocab_size=300, validation_percent=20, seq_len=SEQ_LEN)
    return DataConfig(**{**settings, **changes})


def _run(config, out, workers=0, **options):
    return pretokenize.pretokenize(config, out, workers=workers, shard_mb=SHARD_MB,
                                   progress=False, **options)


def _files(directory: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def written(corpus_dir, tmp_path_factory):
    """(config, directory) of the corpus pre-tokenised in this process."""
    root = tmp_path_factory.mktemp("written")
    config = _config(corpus_dir, root / "cache")
    _run(config, root / "tokens")
    return config, root / "tokens"


def test_windows_equal_the_in_memory_path(written):
    config, directory = written
    meta = json.loads((directory / shards.META_FILE).read_text())
    assert len(meta["splits"]["train"]["shards"]) >= 3  # the test covers shard boundaries
    direct = prepare.prepare_data(config, progress=False)
    loaded = prepare.prepare_data(DataConfig(source="array_record", paths=(str(directory),),
                                             seq_len=SEQ_LEN))
    assert loaded.tokenizer.fingerprint() == direct.tokenizer.fingerprint()
    assert loaded.eod_id == direct.eod_id
    assert loaded.report.documents == direct.report.documents == 60
    for split in ("train", "validation"):
        want, got = getattr(direct, split), getattr(loaded, split)
        assert len(got) == len(want) > 0
        np.testing.assert_array_equal(np.stack([got[i] for i in range(len(got))]),
                                      np.stack([want[i] for i in range(len(want))]))
        assert got.fingerprint()["tokens"] == want.fingerprint()["tokens"]
        np.testing.assert_array_equal(got.token_counts(300), want.token_counts(300))
    first = next(iter(pipeline.batches(loaded.train, 4, None, seed=5, num_threads=0)))
    np.testing.assert_array_equal(
        first["tokens"], next(iter(pipeline.batches(direct.train, 4, None, seed=5,
                                                    num_threads=0)))["tokens"])


def _stop_after(documents: int):
    """A `SplitWriter.add` that stops the run (KeyboardInterrupt) at its `documents`-th call."""
    add, calls = shards.SplitWriter.add, []

    def add_then_stop(self, index, tokens):
        calls.append(index)
        if len(calls) == documents:
            raise KeyboardInterrupt
        add(self, index, tokens)

    return add_then_stop


def test_worker_processes_and_a_resumed_run_write_the_same_bytes(written, corpus_dir, tmp_path,
                                                                 monkeypatch):
    config, directory = written
    config = _config(corpus_dir, tmp_path / "cache")
    _run(config, tmp_path / "workers", workers=2)
    assert _files(tmp_path / "workers") == _files(directory)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(shards.SplitWriter, "add", _stop_after(40))  # mid-shard
    with pytest.raises(KeyboardInterrupt):
        _run(config, interrupted)
    monkeypatch.undo()
    assert not (interrupted / shards.META_FILE).exists()
    assert list(interrupted.glob("*.partial"))  # the shard being written when it stopped
    finished = sorted(p.name for p in interrupted.glob("train-*.json"))
    assert finished and len(finished) < len(list(directory.glob("train-*.json")))
    _run(config, interrupted)
    assert _files(interrupted) == _files(directory)
    before = _files(interrupted)
    _run(config, interrupted)  # finished: left as it is
    assert _files(interrupted) == before


def test_other_settings_on_the_same_directory_are_refused(written, corpus_dir, tmp_path,
                                                          monkeypatch):
    config, directory = written
    with pytest.raises(DataError, match=r"other settings \(seq_len: 16 -> 32\)"):
        _run(_config(corpus_dir, config.cache_dir, seq_len=32), directory)
    with pytest.raises(DataError, match="data.mixture is set"):
        _run(DataConfig(mixture=(MixtureSource("a", paths=("x",)),)), tmp_path / "mixed")

    # A stopped run whose source changed is not continued over the new files.
    copied = _copy(corpus_dir, tmp_path / "copied")
    changed = _config(copied, config.cache_dir)
    monkeypatch.setattr(shards.SplitWriter, "add", _stop_after(30))
    with pytest.raises(KeyboardInterrupt):
        _run(changed, tmp_path / "changed")
    monkeypatch.undo()
    (copied / "doc99.txt").write_text("one more document\n")
    with pytest.raises(DataError, match=r"other settings \(files: "):
        _run(changed, tmp_path / "changed")

    # Nothing made yet (a source that failed): a corrected command may take the directory.
    with pytest.raises(FileNotFoundError, match="nope"):
        _run(_config(tmp_path / "nope", config.cache_dir), tmp_path / "fresh")
    _run(config, tmp_path / "fresh")
    assert _files(tmp_path / "fresh") == _files(directory)


def test_pipeline_reads_only_this_processes_rows(written):
    _, directory = written
    train = prepare.prepare_data(DataConfig(source="array_record", paths=(str(directory),),
                                            seq_len=SEQ_LEN)).train

    class Counted:
        def __init__(self):
            self.seen, self.seq_len = [], train.seq_len

        def __len__(self):
            return len(train)

        def read(self, indices):
            self.seen.extend(int(i) for i in indices)
            return train.read(indices)

    whole = iter(pipeline.batches(train, 4, None, seed=2, num_threads=0))
    sources = [Counted(), Counted()]
    halves = [iter(pipeline.batches(sources[p], 4, None, seed=2, process_index=p,
                                    process_count=2, num_threads=0, prefetch=0))
              for p in range(2)]
    for _ in range(12):
        parts = [next(h)["tokens"] for h in halves]
        np.testing.assert_array_equal(np.concatenate(parts), next(whole)["tokens"])
    assert len(sources[0].seen) == len(sources[1].seen) == 12 * 2
    epoch = len(train) // 4 * 4
    if 12 * 4 <= epoch:  # within one epoch the processes' rows are disjoint
        assert not set(sources[0].seen) & set(sources[1].seen)


def _copy(directory: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    for name, data in _files(directory).items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(data)
    return target


def _open(directory, seq_len=SEQ_LEN, **changes):
    return prepare.prepare_data(DataConfig(source="array_record", paths=(str(directory),),
                                           seq_len=seq_len, **changes))


def test_bad_corpora_are_named_before_training(written, tmp_path):
    _, directory = written
    with pytest.raises(DataError, match=r"data.seq_len=32, but .* holds windows of 16 \+ 1"):
        _open(directory, seq_len=32)

    missing = _copy(directory, tmp_path / "missing")
    (missing / "train-00001.array_record").unlink()
    with pytest.raises(DataError, match="train-00001.array_record is missing"):
        _open(missing)

    truncated = _copy(directory, tmp_path / "truncated")
    shard = truncated / "validation-00000.array_record"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(DataError, match="validation-00000.array_record has .* truncated"):
        _open(truncated)

    retokenized = _copy(directory, tmp_path / "retokenized")
    file = retokenized / shards.TOKENIZER_DIR / "tokenizer.json"
    tokenizer = json.loads(file.read_text())
    tokenizer["model"]["vocab"]["zzzz"] = tokenizer["model"]["vocab"].pop(
        next(iter(tokenizer["model"]["vocab"])))
    file.write_text(json.dumps(tokenizer))
    with pytest.raises(DataError, match="tokenizer in .* is not the one"):
        _open(retokenized)

    other = tmp_path / "other_tokenizer"
    _copy(directory / shards.TOKENIZER_DIR, other)
    (other / "tokenizer.json").write_text(file.read_text())
    with pytest.raises(DataError, match="tokenised with another tokenizer than data.tokenizer"):
        _open(directory, tokenizer=str(other))

    uncounted = _copy(directory, tmp_path / "uncounted")
    (uncounted / "train.counts.npy").unlink()
    with pytest.raises(DataError, match="train.counts.npy is missing"):
        _open(uncounted)

    untokenized = _copy(directory, tmp_path / "untokenized")
    (untokenized / shards.TOKENIZER_DIR / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="holds no tokenizer.json"):
        _open(untokenized)

    unfinished = _copy(directory, tmp_path / "unfinished")
    (unfinished / shards.META_FILE).unlink()
    with pytest.raises(DataError, match="is not finished .* rerun python -m engram_jax.pretok"):
        _open(unfinished)

    old = _copy(directory, tmp_path / "old")
    meta = json.loads((old / shards.META_FILE).read_text())
    del meta["format"]
    (old / shards.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DataError, match="is format 1, this version reads format 2"):
        _open(old)
    with pytest.raises(DataError, match="holds a corpus of format 1"):
        _run(DataConfig(source="text", paths=("x",)), old)
    with pytest.raises(FileNotFoundError, match="has no meta.json"):
        _open(tmp_path)


def test_an_empty_source_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    config = DataConfig(source="text", paths=(str(tmp_path / "empty.txt"),),
                        tokenizer_vocab_size=300, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="no training document"):
        _run(config, tmp_path / "out")


def test_command_line(corpus_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(pathlib.Path(__file__).parent.parent)  # configs/ is found from the root
    args = ["--config", "configs/tiny.yaml", "--out", str(tmp_path / "out"), "--workers", "0",
            "--no-progress", "data.source=text", f"data.paths=['{corpus_dir}/*.txt']",
            f"data.cache_dir={tmp_path / 'cache'}", "data.tokenizer_vocab_size=300",
            "data.validation_percent=20", f"data.seq_len={SEQ_LEN}"]
    assert pretokenize.main(args) == 0
    assert "training tokens in" in capsys.readouterr().out
    assert pretokenize.main(args[:-1] + ["data.seq_len=32"]) == 2
    assert "other settings (seq_len: 16 -> 32)" in capsys.readouterr().err
    assert pretokenize.main(args[:-1] + ["data.seq_len=1"]) == 2
    assert "data.seq_len" in capsys.readouterr().err


def test_a_mixture_draws_its_sources_by_weight_on_every_process():
    sources = [(prepare.Windows(np.full(400, value, np.int32), SEQ_LEN), weight)
               for value, weight in ((0, 1.0), (1, 2.0), (2, 5.0))]
    whole = iter(pipeline.batches(sources, 8, None, seed=4, num_threads=0))
    halves = [iter(pipeline.batches(sources, 8, None, seed=4, process_index=p,
                                    process_count=2, num_threads=0)) for p in range(2)]
    seen = []
    for _ in range(200):
        tokens = next(whole)["tokens"]
        np.testing.assert_array_equal(np.concatenate([next(h)["tokens"] for h in halves]),
                                      tokens)
        seen.extend(tokens[:, 0])
    shares = np.bincount(seen, minlength=3) / len(seen)
    np.testing.assert_allclose(shares, [1 / 8, 2 / 8, 5 / 8], atol=0.01)


def test_mixture_settings_are_checked():
    from engram_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.mixture\[1\].weight=0.0: must be > 0"):
        load_config("tiny", ["data.mixture=[{name: a, paths: x}, {name: b, weight: 0, "
                             "paths: y}]"])
    with pytest.raises(ConfigError, match=r"data.mixture\[1\].name='a'"):
        load_config("tiny", ["data.mixture=[{name: a, paths: x}, {name: a, paths: y}]"])
    with pytest.raises(ConfigError, match=r"data.mixture\[0\].paths=\(\): source 'text' needs"):
        load_config("tiny", ["data.mixture=[{name: a, source: text}]"])
    with pytest.raises(ConfigError, match="leave data.paths empty"):
        load_config("tiny", ["data.paths=x", "data.mixture=[{name: a, paths: x}]"])
