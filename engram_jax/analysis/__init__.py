"""Analysis tools that work on any checkpoint (`python -m engram_jax.analysis.X --help`):

  logit_lens    per-layer KL divergence between early-exit and final predictions
  cka           linear CKA between the layers of two checkpoints, as a heatmap
  gates         Engram gate values over the tokens of a text, as a heatmap
  table_usage   rows touched, hits per row (Zipf plot) and hash collisions per head

`probe` loads checkpoints and the validation inputs they are compared on.
"""
