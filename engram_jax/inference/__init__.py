"""Decoding: `Generator` and `generate` (texts), `Decoder` and `decode_ids` (token ids),
`Sampling`; the command line is `python -m engram_jax.generate` (docs/ARCHITECTURE.md,
"Decoding")."""

from engram_jax.inference.decode import (DecodeResult, Decoder, Generation, GenerationError,
                                         Generator, decode_ids, generate)
from engram_jax.inference.sampling import Sampling

__all__ = ["DecodeResult", "Decoder", "Generation", "GenerationError", "Generator", "Sampling",
           "decode_ids", "generate"]
