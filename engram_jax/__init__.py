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

from engram_jax.config import ConfigError, EngramConfig
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.data.hashing import NgramHasher
from engram_jax.data.tokenizer import TextTokenizer, cached_bpe_tokenizer, load_tokenizer
from engram_jax.interop import load_reference_state_dict
from engram_jax.nn.engram import Engram
from engram_jax.nn.model import Transformer

__all__ = [
    "CompressedTokenizer", "ConfigError", "Engram", "EngramConfig", "NgramHasher",
    "TextTokenizer", "Transformer", "cached_bpe_tokenizer", "load_reference_state_dict",
    "load_tokenizer",
]
