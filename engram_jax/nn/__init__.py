"""The network: parameters and initialisers, norms, attention, FFN, MoE, mHC, Engram, the model.

Each module holds the pure functions of its math (arrays in, arrays out, shapes in their
docstrings) beside the NNX module that owns the parameters and calls them:

  params         `logical_param` (parameters named with `engram_jax.sharding.axes`), initialisers
  normalization  RMSNorm
  attention      RoPE, causal MHA / GQA
  ffn            the dense SwiGLU
  moe            DeepSeekMoE: routing, dropless and capacity dispatch, the balancing bias
  mhc            manifold-constrained hyper-connections: Sinkhorn, read, write
  engram         the Engram module: lookup, gate, short convolution
  model          `Block` and `Transformer`
"""

from engram_jax.nn.engram import Engram
from engram_jax.nn.model import Block, Transformer

__all__ = ["Block", "Engram", "Transformer"]
