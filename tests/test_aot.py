"""`python -m engram_jax.aot`: the trainer's step compiled by libtpu for small TPU topologies (no
TPU needed; `make test` installs libtpu in .venv/libtpu), and its errors."""

import json

import pytest

from engram_jax import aot
from engram_jax.config import load_config
from engram_jax.table_layout import table_layout

TINY = ["--config", "tiny", "--topology", "v5p:2x2x1"]
# The paper's Engram-27B at full width, cut to four blocks (block 0 dense; blocks 1-3 MoE with 55
# experts, one scanned run with Engram in block 1) and 2,048 tokens per chip: enough for the routed
# experts to dominate, so dispatching the global batch on every chip, or computing every
# expert's weight gradient over every row, would each multiply the compiled FLOPs several times
# over the analytic count, in the single block and in the scanned body alike.
PAPER_CUT = ["--config", "paper_engram27b", "--topology", "v5p:2x2x1", "--batch", "4",
             "--seq-len", "2048", "--mesh", "fsdp=4", "model.num_layers=4",
             "model.engram.layer_ids=[1]", "model.remat=full", "model.dtype=bfloat16"]


def _run(args, capsys) -> tuple[int, dict | None, str]:
    code = aot.main(args)
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return code, (json.loads(lines[-1]) if lines else None), err


def test_tiny_compiles_and_reports(capsys):
    code, result, err = _run(TINY + ["--mesh", "fsdp=4"], capsys)
    assert code == 0, err
    assert result["chips"] == 4 and result["device_kind"] == "TPU v5"
    assert result["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
    assert result["hbm_gib"] == pytest.approx(95.74)  # v5p, as its compiler states it
    parts = result["argument_gib"] + result["output_gib"] - result["alias_gib"]
    assert result["total_gib"] == pytest.approx(parts + result["temp_gib"], abs=2e-3)
    assert result["fits"] and result["involuntary_remat"] == 0
    assert result["flops_per_chip"] > 0 and result["analytic_flops_per_chip"] > 0
    assert result["splash_calls"] == 0  # 32 tokens: "auto" keeps XLA's attention
    # fsdp: weights gathered forward, gradients reduce-scattered backward.
    assert result["collective_bytes_per_chip"]["all-gather"] > 0
    assert result["collective_bytes_per_chip"]["reduce-scatter"] > 0


def test_expert_parallel_step_exchanges_tokens(capsys):
    code, result, err = _run(TINY + ["--mesh", "data=1,expert=4"], capsys)
    assert code == 0, err
    assert result["mesh"]["expert"] == 4 and result["involuntary_remat"] == 0
    assert result["collective_bytes_per_chip"]["all-to-all"] > 0


def test_paper_blocks_do_no_redundant_work(capsys):
    code, result, err = _run(PAPER_CUT, capsys)
    assert code == 0, err
    assert result["fits"] and result["involuntary_remat"] == 0, err
    # "auto" on TPU; per call site (block 0, one scanned body): forward, its rematerialised
    # copy, dq and dkv.
    assert result["splash_calls"] == 8
    # The compiler counts the scanned body once, its Engram switch as the Engram branch: the
    # basis counts blocks 1-3 as block 1 (leaving out attention alone would give about 0.94).
    assert result["analytic_counted_flops_per_chip"] < 0.9 * result["analytic_flops_per_chip"]
    assert 0.7 <= result["flops_ratio"] <= 1.15, result


def test_host_tables_leave_the_chips_and_are_counted_on_the_host(capsys):
    """tiny with heads of about 2^20 rows, sparse Adam: with the tables on the host the chips
    hold neither them nor their moments (3 x 128 MiB over 4 chips), only the rows."""
    sizes = "model.engram.vocab_size_per_ngram=[1048576,1048576]"
    common = TINY + ["--mesh", "fsdp=4", "train.table_optimizer=sparse_adam", sizes]
    engram = load_config("tiny", [sizes]).model.engram
    rows = sum(layer.padded_rows for layer in table_layout(engram).layers)
    results = {}
    for placement in ("device", "host"):
        code, results[placement], err = _run(
            common + [f"model.engram.table_placement={placement}"], capsys)
        assert code == 0, err
    device, host = results["device"], results["host"]
    assert host["table_placement"] == "host" and device["host_tables_gib"] == 0
    tables_and_moments = 3 * rows * engram.head_dim * 4 / 2**30  # float32, 3 copies
    assert host["host_tables_gib"] == pytest.approx(tables_and_moments, rel=0.01)
    saved = device["argument_gib"] - host["argument_gib"]
    assert saved == pytest.approx(tables_and_moments / 4, rel=0.05)
    assert host["total_gib"] < device["total_gib"] - 0.9 * tables_and_moments / 4


def test_splash_attention_with_packed_documents_compiles(capsys):
    """Segment ids reach the kernel; four blocks: block 0 and one scan of blocks 1-3."""
    code, result, err = _run(TINY + ["--mesh", "data=2,fsdp=2", "--seq-len", "256",
                                      "model.num_layers=4", "data.document_mask=true"], capsys)
    assert code == 0, err
    assert result["fits"] and result["involuntary_remat"] == 0, err
    assert result["splash_calls"] == 6  # two call sites (the scanned body is one)


@pytest.mark.parametrize("args, message", [
    (TINY[:2] + ["--topology", "v5p:3x3x7x2"], "--topology 'v5p:3x3x7x2'"),
    (TINY + ["--mesh", "fsdp=3"], "4 devices"),
    (TINY + ["--mesh", "fsdp=4,pipeline=2"], "--mesh"),
    (TINY + ["--mesh", "expert=4", "model.moe.num_routed_experts=6"],
     "model.moe.num_routed_experts=6"),
    (TINY + ["model.no_such_key=1"], "no_such_key"),
    (TINY + ["model.attention=splash"], "model.attention='splash': needs data.seq_len"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    code, result, err = _run(args, capsys)
    assert code == 2 and result is None, err
    assert message in err and "Traceback" not in err


def test_a_step_that_does_not_fit_exits_1_with_the_sizes(capsys):
    # v5e chips offer 15.75 GiB; attention scores of 128 sequences of 4,096 tokens per chip need
    # far more.
    code, _, err = _run(["--config", "tiny", "--topology", "v5e:2x2", "--batch", "512",
                         "--seq-len", "4096", "model.attention=xla"], capsys)
    assert code == 1
    assert "does not fit on v5e:2x2" in err and "Traceback" not in err
    assert "15.75G" in err or "15.75 GiB" in err


def test_without_libtpu_the_error_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(aot, "_libtpu_path", lambda: None)
    code, _, err = _run(TINY, capsys)
    assert code == 2 and "libtpu not found: run `make libtpu`" in err


def test_abstract_state_has_the_trainers_shardings():
    """What is compiled is laid out as the trainer lays out its state (8 CPU devices here)."""
    import jax
    from flax import nnx

    from engram_jax.config import load_config
    from engram_jax.sharding import make_mesh, use_mesh
    from engram_jax.train.step import create_train_state

    config = load_config("tiny", ["sharding.data=2", "sharding.fsdp=2", "sharding.tensor=2",
                                  "model.num_layers=4"])  # layers 2-3 stacked
    mesh = make_mesh(config.sharding)
    with use_mesh(config.sharding, mesh):
        real = nnx.state(create_train_state(config))
        abstract = nnx.state(aot.abstract_train_state(config, mesh))
    flat_real, flat_abstract = dict(nnx.to_flat_state(real)), dict(nnx.to_flat_state(abstract))
    assert flat_real.keys() == flat_abstract.keys()
    split = 0
    for path, variable in flat_real.items():
        value, spec = variable.get_value(), flat_abstract[path].get_value()
        if not isinstance(value, jax.Array):
            continue
        assert spec.shape == value.shape and spec.dtype == value.dtype, path
        assert spec.sharding.is_equivalent_to(value.sharding, value.ndim), path
        split += not value.sharding.is_fully_replicated
    assert split > 20  # the comparison covers the split parameters and their Adam moments


def test_mesh_axes_may_split_a_torus_axis():
    """8 x 8 over a 4x4x4 torus: no axis is a product of whole physical axes."""
    from engram_jax.config import ShardingConfig
    from engram_jax.sharding import make_mesh

    mesh = make_mesh(ShardingConfig(data=1, fsdp=8, expert=8), aot.topology_devices("v5p:4x4x4"))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "expert": 8, "tensor": 1}
