"""Loading the reference demo's state dict: names, layouts and errors."""

import numpy as np
import pytest
from flax import nnx

from engram_jax.nn.engram import Engram
from engram_jax.interop import load_reference_state_dict
from reference import engram_config, load_case


def _case():
    settings, ref = load_case("module", "trigram_hc4")
    state = {k[len("state."):]: v for k, v in ref.items() if k.startswith("state.")}
    module = Engram(engram_config(settings), settings["layer_id"], settings["hidden_size"],
                    settings["hc_mult"], rngs=nnx.Rngs(0))
    return module, state


def test_layouts():
    module, state = _case()
    load_reference_state_dict(module, state)
    np.testing.assert_array_equal(module.table[...][:module.layout.rows],
                                  state["multi_head_embedding.embedding.weight"])
    np.testing.assert_array_equal(module.key_kernel[...][2], state["key_projs.2.weight"].T)
    np.testing.assert_array_equal(module.query_norm[...][1], state["norm2.1.weight"])
    conv = state["short_conv.conv.weight"]  # (G*D, 1, taps), channels stream-major
    d = module.hidden_size
    np.testing.assert_array_equal(module.conv_kernel[...][:, 3, 5], conv[3 * d + 5, 0, :])


def test_errors_name_the_entry():
    module, state = _case()
    with pytest.raises(KeyError, match="norm1.0.weight"):
        load_reference_state_dict(module, {k: v for k, v in state.items() if k != "norm1.0.weight"})
    with pytest.raises(KeyError, match="unexpected entries: \\['extra'\\]"):
        load_reference_state_dict(module, {**state, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match="value_kernel"):
        load_reference_state_dict(module, {**state, "value_proj.weight": np.zeros((32, 8))})
    offsets = state["multi_head_embedding.offsets"].copy()
    offsets[1] += 1
    with pytest.raises(ValueError, match="different table sizes"):
        load_reference_state_dict(module, {**state, "multi_head_embedding.offsets": offsets})
