"""Corpus reading and splitting, bad input, packing, the grain pipeline and its state."""

import json

import numpy as np
import pytest

from engram_jax.data import corpus, pipeline, prepare
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.config import DataConfig, EngramConfig
from engram_jax.data.hashing import NgramHasher

ENGRAM = EngramConfig(vocab_size_per_ngram=(101, 103), n_embed_per_ngram=16, n_head_per_ngram=2,
                      layer_ids=(0, 2), pad_id=1)


def _hasher(vocab=64, reset=False):
    config = EngramConfig(**{**ENGRAM.__dict__, "reset_at_document_boundary": reset})
    return NgramHasher(config, CompressedTokenizer.identity(vocab), separator_id=0)


def test_split_is_a_fixed_function_of_the_key():
    keys = [f"dir/file_{i}.py" for i in range(4000)]
    first = [corpus.in_validation(k, 5.0) for k in keys]
    assert first == [corpus.in_validation(k, 5.0) for k in reversed(keys)][::-1]
    assert 0.03 < np.mean(first) < 0.07
    assert corpus.in_validation("os.py", 5.0) == corpus.in_validation("os.py", 5.0)


def test_embedded_corpus_is_the_standard_library():
    root, files = corpus.stdlib_files()
    names = {str(p.relative_to(root)) for p in files}
    assert {"os.py", "json/__init__.py"} <= names
    assert not any(part in ("test", "site-packages") for n in names for part in n.split("/")[:-1])


def test_bad_input_is_reported_not_lost(tmp_path):
    (tmp_path / "good.txt").write_text("hello world")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 and na\xefve")
    report = corpus.CorpusReport()
    config = DataConfig(source="text", paths=(str(tmp_path / "*.txt"),))
    docs = dict(corpus.iter_documents(config, report))
    assert report.documents == 2 and report.empty_skipped == 1 and report.replaced_bytes == 2
    assert docs["latin1.txt"] == "caf\ufffd and na\ufffdve"  # keys: below the glob's directory
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        list(corpus.iter_documents(DataConfig(source="text", paths=(str(tmp_path / "nope.txt"),)),
                                   report))


def test_jsonl_and_parquet_fields(tmp_path):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(3)] + ["", '{"body": "x"}']
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    config = DataConfig(source="jsonl", paths=(str(tmp_path / "a.jsonl"),))
    with pytest.raises(corpus.DataError, match="a.jsonl:5: no field 'text'"):
        list(corpus.iter_documents(config, corpus.CorpusReport()))
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:4]))
    assert len(list(corpus.iter_documents(config, corpus.CorpusReport()))) == 3
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["one", "two", None]}), tmp_path / "a.parquet")
    config = DataConfig(source="parquet", paths=(str(tmp_path / "a.parquet"),), field="content")
    report = corpus.CorpusReport()
    assert [t for _, t in corpus.iter_documents(config, report)] == ["one", "two"]
    assert report.null_skipped == 1
    with pytest.raises(corpus.DataError, match="no column 'text'"):
        list(corpus.iter_documents(DataConfig(source="parquet", paths=config.paths),
                                   corpus.CorpusReport()))


def test_data_config_errors():
    from engram_jax.config import ConfigError

    with pytest.raises(ConfigError, match="data.paths"):
        DataConfig(source="text")
    with pytest.raises(ConfigError, match="data.source='csv'"):
        DataConfig(source="csv")


def test_packing_keeps_every_token_and_ends_documents():
    from engram_jax.data.tokenizer import train_bpe_tokenizer

    texts = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"] * 5
    tokenizer = train_bpe_tokenizer(texts, 300)
    eod = tokenizer.token_id(prepare.EOD_TOKEN)
    stream = prepare.tokenize_stream(tokenizer, texts, eod)
    assert (stream == eod).sum() == len(texts) and stream[-1] == eod
    assert tokenizer.decode(stream[:np.argmax(stream == eod)].tolist()) == texts[0]
    windows = prepare.Windows(stream, 8)
    np.testing.assert_array_equal(np.concatenate([windows[i][:-1] for i in range(len(windows))]),
                                  stream[:len(windows) * 8])
    np.testing.assert_array_equal(windows[0][-1], windows[1][0])  # targets overlap the next input


def _stream(n=4000, vocab=64):
    return np.random.default_rng(0).integers(0, vocab, n).astype(np.int32)


def _windows(stream, seq_len=16):
    return prepare.Windows(stream, seq_len)


def test_pipeline_hash_ids_equal_the_hashing_module():
    hasher = _hasher(reset=True)
    batch = next(iter(pipeline.batches(_windows(_stream()), 4, hasher, seed=0)))
    assert batch["tokens"].shape == (4, 17) and batch["tokens"].dtype == np.int32
    expected = hasher(batch["tokens"][:, :-1])
    assert batch["hash_ids"].keys() == expected.keys()
    for layer in expected:
        np.testing.assert_array_equal(batch["hash_ids"][layer], expected[layer])


def test_iterator_restores_to_the_next_batch():
    dataset = pipeline.batches(_windows(_stream()), 4, _hasher(), seed=3)
    iterator = iter(dataset)
    for _ in range(5):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator)["tokens"] for _ in range(3)]
    restored = iter(pipeline.batches(_windows(_stream()), 4, _hasher(), seed=3))
    restored.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(restored)["tokens"], want)


def test_two_processes_see_the_same_global_batches():
    single = iter(pipeline.batches(_windows(_stream()), 4, _hasher(), seed=1))
    halves = [iter(pipeline.batches(_windows(_stream()), 4, _hasher(), seed=1, process_index=i,
                                process_count=2)) for i in range(2)]
    for _ in range(40):  # past the end of the first epoch (62 windows / 4 = 15 batches)
        whole = next(single)
        parts = [next(h) for h in halves]
        np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in parts]),
                                      whole["tokens"])
        np.testing.assert_array_equal(np.concatenate([p["hash_ids"][0] for p in parts]),
                                      whole["hash_ids"][0])


def test_epochs_are_reshuffled_and_cover_every_window():
    windows = len(prepare.Windows(_stream(), 16))
    iterator = iter(pipeline.batches(_windows(_stream()), 2, None, seed=0, num_threads=0))
    per_epoch = windows // 2
    epochs = [[tuple(map(tuple, next(iterator)["tokens"])) for _ in range(per_epoch)]
              for _ in range(2)]
    assert epochs[0] != epochs[1]
    seen = {window for batch in epochs[0] for window in batch}
    assert len(seen) == 2 * per_epoch  # one epoch: every window once (less the remainder)


def test_unigram_baseline():
    train = np.array([0, 0, 0, 1])
    loss = pipeline.unigram_cross_entropy(np.bincount(train), np.bincount(np.array([0, 1])))
    np.testing.assert_allclose(loss, -(np.log(4 / 6) + np.log(2 / 6)) / 2)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="0 sequences of 17 tokens are fewer than one batch"):
        pipeline.batches(_windows(np.arange(5, dtype=np.int32)), 1, None, seed=0)
    with pytest.raises(ValueError, match="fewer than one batch of train.batch_size=64"):
        pipeline.batches(_windows(_stream(100)), 64, None, seed=0)


def test_hugging_face_source_through_a_stand_in_module(monkeypatch):
    """The `datasets` path, with a stand-in for the library (the real one needs network)."""
    import sys
    import types

    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return iter([{"content": "first"}, {"content": ""}, {"content": "third"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    config = DataConfig(source="hf", hf_name="org/corpus", hf_split="train", field="content")
    report = corpus.CorpusReport()
    docs = list(corpus.iter_documents(config, report))
    assert calls == [("org/corpus", "train", True)]  # streamed, never copied whole
    assert docs == [("org/corpus:0", "first"), ("org/corpus:2", "third")]
    assert report.empty_skipped == 1
    with pytest.raises(corpus.DataError, match="record 0 has no column 'text' \\(columns: content"):
        list(corpus.iter_documents(DataConfig(source="hf", hf_name="org/corpus"), report))


def test_bad_records_are_skipped_and_counted(tmp_path):
    """null, non-string, empty and non-JSON records are never trained on: each is counted."""
    lines = ['{"text": "kept one"}', '{"text": null}', '{"text": ["a", "list"]}', '{"text": 7}',
             '{"text": "  "}', "not json at all", '{"text": "kept two"}']
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    report = corpus.CorpusReport()
    config = DataConfig(source="jsonl", paths=(str(tmp_path / "a.jsonl"),))
    assert [t for _, t in corpus.iter_documents(config, report)] == ["kept one", "kept two"]
    assert (report.null_skipped, report.non_string_skipped, report.empty_skipped,
            report.invalid_json_skipped, report.skipped) == (1, 2, 1, 1, 5)
    assert "1 null, 2 not text" in report.summary()
    assert report.metrics()["data/null_skipped"] == 1
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(corpus.DataError, match="ints.parquet holds no usable document"):
        corpus.split_documents(DataConfig(source="parquet",
                                          paths=(str(tmp_path / "ints.parquet"),)))


def test_a_source_with_nothing_usable_is_one_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(corpus.DataError, match="empty.txt holds no usable document"):
        corpus.split_documents(DataConfig(source="text", paths=(str(tmp_path / "empty.txt"),)))


def test_one_text_file_is_split_by_lines(tmp_path):
    lines = [f"line {i} of the only file" for i in range(100)]
    (tmp_path / "book.txt").write_text("\n".join(lines) + "\n")
    train, validation, report = corpus.split_documents(
        DataConfig(source="text", paths=str(tmp_path / "book.txt"), validation_percent=10))
    assert report.documents == 1 and len(train) == len(validation) == 1
    assert train[0] + validation[0] == (tmp_path / "book.txt").read_text()
    share = len(validation[0]) / len(train[0] + validation[0])
    assert validation[0].startswith("line 9") and 0.09 <= share <= 0.11  # by bytes, whole lines


def test_the_end_of_document_token_comes_from_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    from engram_jax.data.tokenizer import TextTokenizer

    vocab = {"a": 0, "b": 1, "</s>": 2, "<s>": 3, "<|endoftext|>": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    assert prepare.end_of_document_id(TextTokenizer(raw, eos_token="</s>")) == 2
    assert prepare.end_of_document_id(TextTokenizer(raw)) == 4  # the conventional name
    assert prepare.end_of_document_id(TextTokenizer(raw), "<s>") == 3  # data.eod_token
    bare = Tokenizer(models.WordLevel({"a": 0, "<s>": 1}, unk_token="a"))
    assert prepare.end_of_document_id(TextTokenizer(bare, bos_token="<s>")) == 1
    with pytest.raises(corpus.DataError, match="set data.eod_token"):
        prepare.end_of_document_id(TextTokenizer(bare))
    with pytest.raises(corpus.DataError, match="data.eod_token='<eot>' is not a token"):
        prepare.end_of_document_id(TextTokenizer(raw), "<eot>")
    # A Hugging Face tokenizer directory names its tokens in tokenizer_config.json.
    TextTokenizer(raw, eos_token="</s>", bos_token="<s>").save(tmp_path / "tok")
    from engram_jax.data.tokenizer import load_tokenizer

    loaded = load_tokenizer(tmp_path / "tok")
    assert (loaded.eos_token, loaded.bos_token) == ("</s>", "<s>")


def test_token_byte_lengths_add_up_to_the_text_bytes():
    from engram_jax.data.tokenizer import train_bpe_tokenizer

    texts = ["caf\u00e9 na\u00efve r\u00e9sum\u00e9 " * 20, "plain ascii text here " * 20]
    tokenizer = train_bpe_tokenizer(texts, 300)
    lengths = tokenizer.token_byte_lengths()
    eod = prepare.end_of_document_id(tokenizer)
    stream = prepare.tokenize_stream(tokenizer, texts, eod)
    assert lengths[eod] == 0
    assert int(lengths[stream].sum()) == sum(len(t.encode("utf-8")) for t in texts)
