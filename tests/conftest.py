"""Test set-up: 8 fake CPU devices, made before jax is first imported; a compilation cache
shared by this session's subprocesses; a small text corpus."""

import atexit
import os
import pathlib
import shutil
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The training subprocesses compile the same tiny programs again and again: a persistent cache,
# new for each session (so nothing stale is ever read) and inherited by every subprocess, makes
# each of them compile once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="engram_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The cache is for the subprocesses: the test processes themselves neither read nor write it.
# Serialising an executable into it crashed a test worker (jax 0.10.2, after other test files
# had run in that process), and xdist then waited for the lost worker until CI timed out.
jax.config.update("jax_enable_compilation_cache", False)

SENTENCES = ["the quick brown fox jumps over the lazy dog.",
             "a journey of a thousand miles begins with a single step.",
             "to be or not to be, that is the question.",
             "all that glitters is not gold; all who wander are not lost."]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> pathlib.Path:
    """40 text files of repeated sentences (a corpus the tiny config learns in a few steps)."""
    directory = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(40):
        lines = [SENTENCES[j] for j in rng.integers(0, len(SENTENCES), 30)]
        (directory / f"doc{i:02d}.txt").write_text("\n".join(lines))
    return directory


def tiny_text_overrides(corpus_dir: pathlib.Path) -> list[str]:
    """configs/tiny.yaml settings that train it on `corpus_dir` (see `corpus_dir`)."""
    return ["data.source=text", f"data.paths=['{corpus_dir}/*.txt']",
            f"data.cache_dir={corpus_dir.parent / 'cache'}", "data.tokenizer_vocab_size=300",
            "data.validation_percent=10", "data.seq_len=32", "data.num_threads=1"]
