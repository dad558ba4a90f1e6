"""Decoding: incremental logits equal the full forward's, hashing on the device is
bit-identical to `NgramHasher`, sampling, stop tokens, host-resident tables, one compile per
shape bucket, and the `engram_jax.generate` command line."""

import json
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_text_overrides
from engram_jax.config import load_config
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.data.hashing import NgramHasher
from engram_jax.inference import decode, host_tables
from engram_jax.inference.decode import GenerationError, generate
from engram_jax.inference.hashing import DeviceHasher, prompt_history
from engram_jax.inference.host_tables import state_without_tables
from engram_jax.inference.sampling import Sampling, sample_tokens
from engram_jax.nn.model import BlockStack, Transformer
from engram_jax.train.loop import train
from engram_jax.train.run_dir import load_trained

ROOT = pathlib.Path(__file__).parent.parent
# Every kind of block: dense block 0, Engram (with a non-zero dilated convolution) and MoE in
# blocks 1 and 4, a scanned stack of MoE blocks 2-3, a last MoE block 5; 4 mHC streams, GQA.
DECODE_OVERRIDES = ["model.num_layers=6", "model.engram.layer_ids=[1,4]",
                    "model.engram.conv_zero_init=false", "model.engram.conv_dilation=2"]
SEPARATOR = 7


def _tiny_model(*overrides) -> Transformer:
    config = load_config(ROOT / "configs/tiny.yaml", [*DECODE_OVERRIDES, *overrides]).model
    return Transformer(config, rngs=nnx.Rngs(3))


@pytest.mark.parametrize("reset", [False, True])
def test_incremental_logits_equal_the_full_forward(reset):
    """Prefill of prompts of three lengths (padded on the right), then one token per step with
    ids from the device hasher: float32 logits equal the full-sequence call at every position,
    with hashes reset at document ends or not."""
    model = _tiny_model(f"model.engram.reset_at_document_boundary={str(reset).lower()}")
    assert any(isinstance(b, BlockStack) for b in model.blocks)
    config = model.config
    hasher = NgramHasher(config.engram, CompressedTokenizer.identity(config.vocab_size),
                         separator_id=SEPARATOR)
    device_hasher = DeviceHasher(hasher, config.vocab_size)
    rng = np.random.default_rng(0)
    batch, length, padded = 3, 24, 12
    tokens = rng.integers(0, config.vocab_size, (batch, length))
    tokens[:, [4, 10, 15]] = SEPARATOR
    full = model(jnp.asarray(tokens), {k: jnp.asarray(v) for k, v in hasher(tokens).items()})
    lengths = np.array([5, 12, 1])
    prompt = np.where(np.arange(padded) < lengths[:, None], tokens[:, :padded], 0)
    cache = model.init_cache(batch, length)
    logits, cache = model.extend(jnp.asarray(prompt), hasher(prompt), cache,
                                 jnp.asarray(lengths))
    for row in range(batch):
        chex.assert_trees_all_close(logits[row, :lengths[row]], full[row, :lengths[row]],
                                    atol=2e-5, rtol=2e-5)
    history = jnp.asarray(prompt_history(hasher, [t[:n].tolist() for t, n in
                                                  zip(tokens, lengths)]))
    step = nnx.jit(lambda model, cache, history, new: (
        model.extend(new[:, None], {k: v[:, None] for k, v in
                                    device_hasher.hash_ids(history, new).items()},
                     cache, jnp.ones((batch,), jnp.int32)),
        device_hasher.next_history(history, new)))
    positions = lengths.copy()
    rows = np.arange(batch)
    while positions.max() < length:  # rows at the end re-read their last token: ignored
        at = np.minimum(positions, length - 1)
        (logits, cache), history = step(model, cache, history, jnp.asarray(tokens[rows, at]))
        live = positions < length
        chex.assert_trees_all_close(logits[live, 0], full[rows[live], at[live]],
                                    atol=2e-5, rtol=2e-5)
        positions += 1


@pytest.mark.parametrize("reset", [False, True])
def test_device_hashing_is_bit_identical_at_the_paper_sizes(reset):
    """The paper config's primes (up to 2.26M rows per head) and multipliers, a compressed
    vocabulary of 90,000: every id of every position equals `NgramHasher`'s, and the history
    after a prompt equals the one the steps leave."""
    import dataclasses

    engram = dataclasses.replace(load_config(ROOT / "configs/paper_engram27b.yaml").model.engram,
                                 reset_at_document_boundary=reset)
    rng = np.random.default_rng(1)
    vocab = 129280
    hasher = NgramHasher(engram, CompressedTokenizer(rng.integers(0, 90000, vocab), 90000),
                         separator_id=SEPARATOR)
    device_hasher = DeviceHasher(hasher, vocab)
    tokens = rng.integers(0, vocab, (4, 30))
    tokens[:, ::7] = SEPARATOR
    expected = hasher(tokens)
    step = jax.jit(lambda history, new: (device_hasher.hash_ids(history, new),
                                         device_hasher.next_history(history, new)))
    history = device_hasher.initial_history(4)
    for t in range(tokens.shape[1]):
        ids, history = step(history, jnp.asarray(tokens[:, t]))
        for layer, want in expected.items():
            np.testing.assert_array_equal(np.asarray(ids[layer]), want[:, t])
    np.testing.assert_array_equal(np.asarray(history), prompt_history(hasher, tokens.tolist()))


def test_sampling_respects_top_k_top_p_temperature_and_the_vocabulary():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05, 0.0]] * 512) + 1e-30)
    keys = jax.random.split(jax.random.key(0), 4)
    greedy = sample_tokens(logits, keys[0], Sampling())
    assert set(np.asarray(greedy).tolist()) == {0}
    top_k = np.asarray(sample_tokens(logits, keys[1], Sampling(1.0, top_k=2)))
    assert set(top_k.tolist()) == {0, 1}
    top_p = np.asarray(sample_tokens(logits, keys[2], Sampling(1.0, top_p=0.9)))
    assert set(top_p.tolist()) == {0, 1, 2}  # 0.5 + 0.3 < 0.9 <= 0.5 + 0.3 + 0.15
    limited = np.asarray(sample_tokens(logits, keys[3], Sampling(1.0), vocab_limit=3))
    assert set(limited.tolist()) == {0, 1, 2}
    again = np.asarray(sample_tokens(logits, keys[1], Sampling(1.0, top_k=2)))
    np.testing.assert_array_equal(again, top_k)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(1.0, top_p=0.0)


@pytest.fixture(scope="module")
def decode_run(corpus_dir, tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("decode_run")
    config = load_config(ROOT / "configs/tiny.yaml", [
        *tiny_text_overrides(corpus_dir), *DECODE_OVERRIDES, f"train.run_dir={run_dir}",
        "train.steps=4", "train.eval_every=4", "train.eval_batches=1",
        "train.checkpoint_every=4", "train.learning_rate=0.01"])
    train(config, progress=False)
    return run_dir


PROMPTS = ["the quick brown fox", "to be or", "a journey of a thousand miles begins"]


def test_greedy_decoding_is_deterministic_and_every_loop_and_table_place_agrees(decode_run):
    """Greedy tokens of three prompts of different lengths: the compiled loop twice, the
    stepwise loop (hashing on the host) and host-resident tables all give the same tokens; the
    device state of the host-table loop holds no table rows."""
    trained = load_trained(decode_run)
    model, tokenizer = trained.model, trained.tokenizer
    kw = dict(max_new_tokens=12, stop_tokens=[])
    first = generate(model, tokenizer, PROMPTS, **kw)
    assert [g.finish_reason for g in first] == ["length"] * 3
    assert all(len(g.tokens) == 12 for g in first)
    assert generate(model, tokenizer, PROMPTS, **kw) == first
    assert generate(model, tokenizer, PROMPTS, loop="stepwise", **kw) == first
    assert generate(model, tokenizer, PROMPTS, engram_tables="host", **kw) == first
    _, state = state_without_tables(model)
    tables = [v for p, v in nnx.to_flat_state(state) if p[-1] == "table"]
    assert len(tables) == 2 and all(t.shape[0] == 0 for t in tables)


def test_a_generator_builds_its_tables_once_and_equals_generate(decode_run, monkeypatch):
    trained = load_trained(decode_run)
    model, tokenizer = trained.model, trained.tokenizer
    copies = []
    monkeypatch.setattr(decode, "HostTables",
                        lambda m: copies.append(m) or host_tables.HostTables(m))
    generator = decode.Generator(model, tokenizer, engram_tables="host")
    kw = dict(max_new_tokens=6, stop_tokens=[])
    results = [generator(PROMPTS, **kw), generator(PROMPTS, **kw)]
    assert len(copies) == 1  # built with the generator, not per call
    assert results[0] == results[1] == generate(model, tokenizer, PROMPTS, **kw)
    # Another generator of the same model reuses the stepwise programs compiled for this one.
    # (the same jitted functions, so their compiled programs are reused).
    again = decode.Generator(model, tokenizer, engram_tables="host")
    assert again(PROMPTS, **kw) == results[0]
    assert again.decoder.step_programs.back is generator.decoder.step_programs.back
    assert again.decoder.step_programs.front is generator.decoder.step_programs.front
    with pytest.raises(GenerationError, match="host tables decode stepwise"):
        generator(PROMPTS, loop="compiled")


def test_sampling_with_a_seed_stop_tokens_and_rows_that_finish_early(decode_run):
    trained = load_trained(decode_run)
    model, tokenizer = trained.model, trained.tokenizer
    kw = dict(max_new_tokens=10)
    warm = Sampling(temperature=1.0, top_k=20)
    sampled = generate(model, tokenizer, PROMPTS, sampling=warm, seed=5, stop_tokens=[], **kw)
    assert generate(model, tokenizer, PROMPTS, sampling=warm, seed=5, stop_tokens=[],
                    **kw) == sampled
    assert generate(model, tokenizer, PROMPTS, sampling=warm, seed=6, stop_tokens=[],
                    **kw) != sampled
    greedy = generate(model, tokenizer, PROMPTS, stop_tokens=[], **kw)
    # A token of row 0 that some other row never produces: row 0 stops early, that row runs on.
    stop, runs_on = next((t, r) for t in greedy[0].tokens for r in (1, 2)
                         if t not in greedy[r].tokens)
    stopped = generate(model, tokenizer, PROMPTS, stop_tokens=[stop], **kw)
    assert stopped[0].tokens == greedy[0].tokens[:greedy[0].tokens.index(stop)]
    assert stopped[0].finish_reason == "stop"
    assert stopped[runs_on] == greedy[runs_on] and greedy[runs_on].finish_reason == "length"
    for row in (1, 2):  # the others go on as before, up to their own stop token
        cut = (greedy[row].tokens.index(stop) if stop in greedy[row].tokens
               else len(greedy[row].tokens))
        assert stopped[row].tokens == greedy[row].tokens[:cut]
    streamed = {0: [], 1: [], 2: []}
    result = generate(model, tokenizer, PROMPTS, stop_tokens=[], **kw,
                      on_text=lambda row, text: streamed[row].append(text))
    assert ["".join(streamed[row]) for row in range(3)] == [g.text for g in result]


def test_the_decode_loop_compiles_once_per_shape_bucket(decode_run, monkeypatch):
    trained = load_trained(decode_run)
    counted = jax.jit(chex.assert_max_traces(decode.decode_on_device.__wrapped__, n=1),
                      static_argnames=("graphdef", "sampling", "max_new", "cache_len",
                                       "stop_tokens", "vocab_limit", "stream"))
    monkeypatch.setattr(decode, "decode_on_device", counted)
    kw = dict(max_new_tokens=6)
    other = ["all that glitters is not gold; all who", "the lazy dog", "not to be, that is"]
    lengths = [len(ids) for ids in trained.tokenizer.encode_batch(PROMPTS + other)]
    assert decode.prompt_bucket(max(lengths[:3]), None) == decode.prompt_bucket(
        max(lengths[3:]), None)  # other prompts, the same shapes
    for prompts in (PROMPTS, other):
        generate(trained.model, trained.tokenizer, prompts, **kw)


def test_generation_refuses_bad_requests_by_name(decode_run):
    trained = load_trained(decode_run)
    model, tokenizer = trained.model, trained.tokenizer
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(model, tokenizer, ["the", ""])
    with pytest.raises(GenerationError, match="maximum length is 32"):
        generate(model, tokenizer, ["the quick brown fox " * 20], max_length=32)
    eod = tokenizer.id_to_token(0)
    with pytest.raises(GenerationError, match="end-of-document"):
        generate(model, tokenizer, [f"the{eod} quick"], document_mask=True)
    with pytest.raises(GenerationError, match="engram_tables"):
        generate(model, tokenizer, ["the"], engram_tables="disk")


def test_generate_command_streams_text_and_names_bad_input(decode_run, tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "engram_jax.generate",
                                        "--checkpoint", str(decode_run), *args],
                                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    ok = run("--prompt", "the quick", "--max-new-tokens", "8", "--engram-tables", "host")
    assert ok.returncode == 0, ok.stderr[-3000:]
    trained = load_trained(decode_run)
    expected = generate(trained.model, trained.tokenizer, ["the quick"], max_new_tokens=8,
                        max_length=trained.config.data.seq_len)[0].text
    assert ok.stdout == "the quick" + expected + "\n"
    empty = run("--prompt", "")
    assert empty.returncode == 2 and "prompt 0 is empty" in empty.stderr
    long = run("--prompt", "the quick brown fox " * 20)
    assert long.returncode == 2 and "maximum length is 32" in long.stderr
    missing = run("--prompt-file", str(tmp_path / "nope.txt"))
    assert missing.returncode == 2 and "nope.txt does not exist" in missing.stderr
    # A checkpoint whose meta and run directory both lack the tokenizer.
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(decode_run, bare)
    shutil.rmtree(bare / "tokenizer")
    for meta in (bare / "checkpoints").glob("*/meta/metadata"):
        values = json.loads(meta.read_text())
        del values["tokenizer"]
        meta.write_text(json.dumps(values))
    no_tokenizer = subprocess.run([sys.executable, "-m", "engram_jax.generate", "--checkpoint",
                                   str(bare), "--prompt", "the"], capture_output=True,
                                  text=True, timeout=600, cwd=ROOT)
    assert no_tokenizer.returncode == 2 and "holds no tokenizer" in no_tokenizer.stderr
