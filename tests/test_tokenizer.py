"""Tokenizer loading, the offline default BPE and its cache."""

import json

import pytest

from engram_jax.data import tokenizer as tokenizer_lib
from reference import TOKENIZER_DIR


def test_load_from_directory_and_file():
    from_dir = tokenizer_lib.load_tokenizer(TOKENIZER_DIR)
    from_file = tokenizer_lib.load_tokenizer(TOKENIZER_DIR / "tokenizer.json")
    assert len(from_dir) == len(from_file) == 603  # 600 trained + 3 added tokens
    text = "def f(x):\n    return x  # Café"
    ids = from_dir.encode_batch([text])[0]
    assert ids == from_file.encode_batch([text])[0]
    assert from_dir.decode(ids) == text


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenizer_lib.load_tokenizer(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        tokenizer_lib.load_tokenizer(tmp_path)


def test_bad_config_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text((TOKENIZER_DIR / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        tokenizer_lib.load_tokenizer(tmp_path)


def test_clean_up_flag_is_ignored_for_bpe_like_transformers(tmp_path):
    (tmp_path / "tokenizer.json").write_text((TOKENIZER_DIR / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"clean_up_tokenization_spaces": True}))
    assert not tokenizer_lib.load_tokenizer(tmp_path).clean_up_tokenization_spaces


def test_clean_up_tokenization_matches_transformers_rules():
    assert tokenizer_lib.clean_up_tokenization("a . b , c ! d ? I 'm do n't") == "a. b, c! d? I'm don't"


def test_unknown_token_errors_name_the_token():
    tok = tokenizer_lib.load_tokenizer(TOKENIZER_DIR)
    with pytest.raises(ValueError, match="not in tokenizer"):
        tok.token_id("<definitely not a token>")
    with pytest.raises(ValueError, match="token id 99999"):
        tok.id_to_token(99999)


def test_train_bpe_round_trips_any_text():
    texts = ["hello world, hello engram", "ümlaut and 日本語 and emoji 🙂"] * 10
    tok = tokenizer_lib.train_bpe_tokenizer(texts, vocab_size=300)
    assert tok.token_id("<|endoftext|>") == 0 and tok.token_id("<|pad|>") == 1
    for text in texts[:2] + ["never seen: Ωμέγα"]:
        assert tok.decode(tok.encode_batch([text])[0]) == text
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        tokenizer_lib.train_bpe_tokenizer(texts, vocab_size=100)


def test_cached_bpe_trains_once(tmp_path, monkeypatch):
    texts = ["a small corpus for a small tokenizer"] * 5
    first = tokenizer_lib.cached_bpe_tokenizer(texts, 280, cache_dir=tmp_path)
    entries = list((tmp_path / "tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer was trained again")

    monkeypatch.setattr(tokenizer_lib, "train_bpe_tokenizer", no_training)
    second = tokenizer_lib.cached_bpe_tokenizer(texts, 280, cache_dir=tmp_path)
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    # A different corpus or size is a different cache entry.
    monkeypatch.undo()
    tokenizer_lib.cached_bpe_tokenizer(texts + ["more"], 280, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2
