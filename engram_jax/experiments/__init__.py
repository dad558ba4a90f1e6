"""The experiment sweeps of docs/RESULTS.md, one module each (`python -m engram_jax.experiments.X`):

  iso_param    dense vs MoE vs Engram-MoE at matched parameters, several seeds
  allocation   validation loss over the allocation ratio rho at fixed total and active parameters
  table_size   validation loss against the number of Engram table slots, backbone fixed
  ablations    Engram variants at equal budget (no gate, single fusion, no compression, ...)

Each writes `results/<name>/runs.csv` and PNG plots; `sweep` holds the shared machinery.
"""
