"""Loading the reference demo's PyTorch `Engram` weights into `engram_jax.nn.engram.Engram`.

The state dict is a mapping of numpy arrays under the demo's own parameter names
(`torch_module.state_dict()` with each tensor turned into `.numpy()`):

  multi_head_embedding.offsets          (K,)           checked against this module's offsets
  multi_head_embedding.embedding.weight (rows, head_dim) -> table
  key_projs.{g}.weight / .bias          (D, E) / (D,)  -> key_kernel[g] (transposed) / key_bias[g]
  norm1.{g}.weight                      (D,)           -> key_norm[g]
  norm2.{g}.weight                      (D,)           -> query_norm[g]
  value_proj.weight / .bias             (D, E) / (D,)  -> value_kernel (transposed) / value_bias
  short_conv.norms.{g}.weight           (D,)           -> conv_norm[g]
  short_conv.conv.weight                (G*D, 1, taps) -> conv_kernel (taps, G, D)
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from engram_jax.nn.engram import Engram


def reference_engram_params(state_dict: Mapping[str, np.ndarray], hc_mult: int,
                            hidden_size: int) -> dict[str, np.ndarray]:
    """Converts the demo's state dict to this module's parameter names and layouts (numpy)."""
    state = {k: np.asarray(v) for k, v in state_dict.items()}
    used = set()

    def take(name: str) -> np.ndarray:
        if name not in state:
            raise KeyError(f"reference state dict has no {name!r}")
        used.add(name)
        return state[name]

    def stack(pattern: str) -> np.ndarray:
        return np.stack([take(pattern.format(g)) for g in range(hc_mult)])

    conv = take("short_conv.conv.weight")  # (G*D, 1, taps)
    if conv.shape[:2] != (hc_mult * hidden_size, 1):
        raise ValueError(f"short_conv.conv.weight has shape {conv.shape}, expected "
                         f"({hc_mult * hidden_size}, 1, taps)")
    params = {
        "offsets": take("multi_head_embedding.offsets"),
        "table": take("multi_head_embedding.embedding.weight"),
        "key_kernel": np.transpose(stack("key_projs.{}.weight"), (0, 2, 1)),
        "key_bias": stack("key_projs.{}.bias"),
        "key_norm": stack("norm1.{}.weight"),
        "query_norm": stack("norm2.{}.weight"),
        "value_kernel": take("value_proj.weight").T,
        "value_bias": take("value_proj.bias"),
        "conv_norm": stack("short_conv.norms.{}.weight"),
        "conv_kernel": np.transpose(conv[:, 0, :], (1, 0)).reshape(-1, hc_mult, hidden_size),
    }
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise KeyError(f"reference state dict has unexpected entries: {unexpected}")
    return params


def load_reference_state_dict(module: Engram, state_dict: Mapping[str, np.ndarray]) -> Engram:
    """Copies the demo's `Engram` weights into `module` in place (and returns it).

    Raises:
      KeyError: a name is missing or unexpected.
      ValueError: a shape differs, or the table offsets show different table sizes.
    """
    params = reference_engram_params(state_dict, module.hc_mult, module.hidden_size)
    offsets = params.pop("offsets")
    if tuple(int(o) for o in offsets) != module.layout.offsets:
        raise ValueError(f"reference table offsets {offsets.tolist()} differ from layer "
                         f"{module.layer_id}'s {list(module.layout.offsets)}: different table "
                         "sizes")
    for name, value in params.items():
        variable = getattr(module, name)
        rows = module.layout.rows
        expected = (rows, variable.shape[1]) if name == "table" else variable.shape
        if value.shape != expected:
            raise ValueError(f"{name}: reference shape {value.shape} != module shape {expected}")
        value = jnp.asarray(value, dtype=variable.dtype)
        # The table's padding rows (never addressed) keep their values.
        variable[...] = variable[...].at[:rows].set(value) if name == "table" else value
    return module
