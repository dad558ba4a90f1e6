"""Decoding: `generate` (texts) and `decode_ids` (token ids), `Sampling`; the command line is
`python -m engram_jax.generate` (docs/ARCHITECTURE.md, "Decoding")."""

from engram_jax.inference.decode import (DecodeResult, Generation, GenerationError, decode_ids,
                                         generate)
from engram_jax.inference.sampling import Sampling

__all__ = ["DecodeResult", "Generation", "GenerationError", "Sampling", "decode_ids", "generate"]
