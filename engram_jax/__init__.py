"""engram_jax: DeepSeek's Engram (hashed n-gram conditional memory) in JAX and Flax NNX.

The package, bottom layer first (a module imports only from its own layer or those below;
`tests/test_structure.py` checks it):

  config        the typed configs (dataclasses) and their YAML / preset loader
  table_layout  every Engram head's prime table size, offsets and padding, built once
  figures       matplotlib helpers
  sharding      logical axis names and their rules, meshes, the routed table lookup, HLO reading
  data          tokenizers, compression, hashing, corpora, token streams, shards, the pipeline
  nn            the network: norms, attention, FFN, MoE, mHC, Engram, the model
  accounting    parameter and FLOP counts, the iso-parameter allocation
  interop       the reference demo's PyTorch weights
  train         the loop, its step, optimiser, evaluation, metrics, checkpoints, run directory
  analysis      tools on trained checkpoints; experiments: the sweeps of docs/RESULTS.md
  evaluate, plot, pretokenize   thin command lines (`python -m engram_jax.X`)

docs/ARCHITECTURE.md follows the data from text to hash ids to lookup to gate to streams.

Main entry points, importable from here:
  - `EngramConfig`, `ConfigError`: the Engram settings, validated.
  - `load_tokenizer`, `cached_bpe_tokenizer`, `TextTokenizer`: Hugging Face tokenizers, and the
    offline default byte-level BPE.
  - `CompressedTokenizer`: token id -> compressed id, as the reference demo.
  - `NgramHasher`: host-side n-gram hash ids, bit-identical to the reference demo.
  - `Engram`: the Flax NNX module; `Transformer`: the model around it.
  - `load_reference_state_dict`: load the reference demo's PyTorch weights.
"""

import importlib

# Name -> the module it comes from, imported on first use, so that `import engram_jax.data.X`
# (the pre-tokenising workers, the config loader) does not import jax and the model.
_EXPORTS = {
    "ConfigError": "engram_jax.config", "EngramConfig": "engram_jax.config",
    "CompressedTokenizer": "engram_jax.data.compression",
    "NgramHasher": "engram_jax.data.hashing",
    "TextTokenizer": "engram_jax.data.tokenizer",
    "cached_bpe_tokenizer": "engram_jax.data.tokenizer",
    "load_tokenizer": "engram_jax.data.tokenizer",
    "load_reference_state_dict": "engram_jax.interop",
    "Engram": "engram_jax.nn.engram", "Transformer": "engram_jax.nn.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engram_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
