"""Compile the trainer's step for a TPU topology ahead of time, with no TPU attached.

  python -m engram_jax.aot --config paper_engram27b --topology v5p:4x4x4 --batch 64 \\
      --seq-len 4096 --mesh fsdp=64 model.remat=full model.dtype=bfloat16

The program compiled is the trainer's own (`engram_jax.train.step.jitted_train_step`: the same
function, shardings and donation) on abstract state (nothing is allocated), by libtpu's
compiler for the devices of `jax.experimental.topologies.get_topology_desc`. One JSON line goes
to stdout: per-chip memory from the compiler (`argument_gib`, `temp_gib`, `output_gib`,
`alias_gib`, `total_gib` = argument + output - alias + temp), the chip's HBM as the compiler
reports it (`hbm_gib`) and `fits`, per-chip FLOPs from the compiler beside the analytic count
(`engram_jax.accounting`, x 4/3 with full remat) and their ratio `flops_ratio`, each kind of
collective's bytes per chip per step (ring estimate, `engram_jax.sharding.hlo`), and how many
"Involuntary full rematerialization" warnings the partitioner gave (each one means work repeated
on every chip).
The compiler's FLOPs count a `while` loop's body once (a scanned run of blocks: one block; the
LM head and loss, computed `model.logits_chunk` positions at a time: one chunk) and
nothing for the splash-attention kernel, which declares no cost (`splash_calls` counts its
compiled kernels); so `flops_ratio` compares them with `analytic_counted_flops_per_chip`, the
analytic count of what the compiler counts (`compiler_counted_flops_per_token`), while
`analytic_flops_per_chip` is the whole step's. With `model.engram.table_placement=host` the
batch also carries the Engram rows and the chips hold no table; `host_tables_gib` is the host
memory the tables and their moments take.

Exit codes: 0 fits, 1 does not fit (the compiler's sizes on stderr), 2 bad input (config,
topology, mesh) or no libtpu. libtpu: the first of an importable `libtpu` package,
`TPU_LIBRARY_PATH`, or the copy `make libtpu` installs in `.venv/libtpu`
(docs/ARCHITECTURE.md, "Compiling for a pod").
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pathlib
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P

from engram_jax.accounting import ParamCounts, count_parameters
from engram_jax.config import ConfigError, load_config
from engram_jax.config.schema import MESH_AXES, Config, ModelConfig
from engram_jax.nn.loss import chunk_size
from engram_jax.nn.model import block_runs
from engram_jax.sharding import hlo
from engram_jax.sharding.axes import BATCH_AXES
from engram_jax.sharding.mesh import check_layout, make_mesh, use_mesh
from engram_jax.table_layout import table_layout
from engram_jax.train.host_tables import host_placement
from engram_jax.train.step import create_train_state, jitted_train_step

GIB = 1024**3
INVOLUNTARY_REMAT = "Involuntary full rematerialization"
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


class DoesNotFit(RuntimeError):
    """The compiler ran out of HBM; the message gives its sizes."""


def _libtpu_path() -> str | None:
    """Where libtpu is: an importable package, TPU_LIBRARY_PATH, or `<venv>/libtpu`."""
    if importlib.util.find_spec("libtpu") is not None:
        return "libtpu package"
    if os.environ.get("TPU_LIBRARY_PATH"):
        return os.environ["TPU_LIBRARY_PATH"]
    bundled = pathlib.Path(sys.prefix) / "libtpu" / "libtpu" / "libtpu.so"
    if bundled.is_file():
        os.environ["TPU_LIBRARY_PATH"] = str(bundled)
        return str(bundled)
    return None


def topology_devices(name: str) -> list:
    """The devices of a TPU topology such as "v5p:4x4x4" (compile-only: nothing runs on them).

    Raises:
      ConfigError: libtpu is missing or the topology is unknown.
    """
    if _libtpu_path() is None:
        raise ConfigError("libtpu not found: run `make libtpu` (installs it in .venv/libtpu), or "
                          "pip install 'libtpu==0.0.42.*', or set TPU_LIBRARY_PATH")
    # Compiling only: no cloud metadata server to ask, and no chip for the lockfile to guard
    # (so that several compiles can run at once).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as err:  # the compiler's own message names what is wrong
        raise ConfigError(f"--topology {name!r}: {str(err).splitlines()[0]}") from None


def _size_gib(text: str) -> float:
    """GiB of the compiler's sizes such as "95.74G"."""
    number, unit = re.fullmatch(r"([0-9.]+)([KMGT]?)B?", text).groups()
    return float(number) * _UNITS[unit] / GIB


def compiler_hbm_gib(device) -> float:
    """The HBM one device offers to a program, as its compiler states it (it is the figure in
    the compiler's out-of-memory message, so this asks for 1 TiB and reads the refusal)."""
    huge = jax.ShapeDtypeStruct((2**40,), jnp.int8,
                                sharding=jax.sharding.SingleDeviceSharding(device))
    try:
        jax.jit(lambda a: a + 1).lower(huge).compile()
    except Exception as err:
        if match := re.search(r"available HBM \(([0-9.]+[KMGT]?)B?\)", str(err)):
            return _size_gib(match.group(1))
    raise RuntimeError(f"could not read the HBM size of {device.device_kind}")


@contextlib.contextmanager
def _captured_stderr(lines: list[str]):
    """Collects what native code writes to stderr (the partitioner's warnings) into `lines`,
    and writes it through afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            sys.stderr.write(text)
            lines.extend(text.splitlines())


def abstract_train_state(config: Config, mesh):
    """The model and optimiser of `create_train_state` with ShapeDtypeStructs for arrays, each
    carrying the sharding the trainer gives it on `mesh`; nothing is allocated. Call under
    `use_mesh`."""
    graphdef = None

    def init():
        nonlocal graphdef
        graphdef, state = nnx.split(create_train_state(config))
        return state

    def attach(variable, sharding):
        value = variable.get_value()
        if not isinstance(value, jax.ShapeDtypeStruct):  # e.g. optax's empty masked nodes
            return variable
        return variable.replace(jax.ShapeDtypeStruct(value.shape, value.dtype,
                                                     sharding=sharding.get_value()))

    state = jax.eval_shape(init)
    state = jax.tree.map(attach, state, nnx.get_named_sharding(state, mesh),
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def abstract_batch(config: Config, mesh) -> dict:
    """ShapeDtypeStructs of a global batch: tokens (B, L + 1), each Engram layer's hash ids
    (B, L, K), with host-resident tables their rows (B, L, E) and, with `data.document_mask`,
    segment ids (B, L), split over the batch axes."""
    batch, length = config.train.batch_size, config.data.seq_len
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    shape = lambda *s, dtype=jnp.int32: jax.ShapeDtypeStruct(s, dtype, sharding=sharding)
    hash_ids, engram = {}, config.model.engram
    if engram is not None:
        layout = table_layout(engram)
        hash_ids = {table.layer_id: shape(batch, length, len(table.head_sizes))
                    for table in layout.layers}
    out = {"tokens": shape(batch, length + 1), "hash_ids": hash_ids}
    if host_placement(config.model):
        out["rows"] = {layer: shape(batch, length, engram.embed_dim,
                                    dtype=jnp.dtype(config.model.param_dtype))
                       for layer in hash_ids}
    if config.data.document_mask:
        out["segment_ids"] = shape(batch, length)
    return out


def compiler_counted_flops_per_token(model: ModelConfig, counts: ParamCounts,
                                     splash: bool) -> int:
    """The part of the analytic FLOPs per token that the compiler's `cost_analysis` counts.

    It counts a `while` loop's body once and a conditional as its costliest branch, so a
    scanned run of blocks (`block_runs`, its Engram layers under a switch) counts as its costliest
    block, and the LM head, computed `model.logits_chunk` positions at a time in a scan, as one
    chunk; and the splash kernel declares no cost, so with it attention is not counted."""
    runs = block_runs(model)
    layers = counts.layer_flops_per_token
    uncounted = sum(sum(layers[first:first + count]) - max(layers[first:first + count])
                    for first, count in runs)
    head = counts.flops_per_token - sum(layers)
    chunks = counts.seq_len // chunk_size(counts.seq_len, model.logits_chunk)
    uncounted += head - head // chunks
    attention = counts.attention_flops_per_token // model.num_layers * len(runs)
    return counts.flops_per_token - uncounted - (attention if splash else 0)


def compile_train_step(config: Config, devices: list) -> dict:
    """Compiles the trainer's step for `devices`; returns the figures of the module docstring.

    Raises:
      ConfigError: the mesh or batch does not fit the devices.
      DoesNotFit: the compiler ran out of HBM.
    """
    check_layout(config, len(devices), 1)
    mesh = make_mesh(config.sharding, devices)
    with use_mesh(config.sharding, mesh):
        model, optimizer = abstract_train_state(config, mesh)
        batch = abstract_batch(config, mesh)
        warnings: list[str] = []
        start = time.perf_counter()
        try:
            with _captured_stderr(warnings):
                compiled = jitted_train_step.lower(model, optimizer, batch,
                                                   config.train.grad_accum).compile()
        except Exception as err:
            if "RESOURCE_EXHAUSTED" in str(err):
                raise DoesNotFit(str(err).splitlines()[0]) from None
            raise
        compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    chips = len(devices)
    sizes = {name: getattr(memory, f"{name}_size_in_bytes") / GIB
             for name in ("argument", "temp", "output", "alias")}
    total = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
    hbm = compiler_hbm_gib(devices[0])
    tokens_per_chip = config.train.batch_size * config.data.seq_len / chips
    remat = 4 / 3 if config.model.remat == "full" else 1.0
    text = compiled.as_text()
    traffic = hlo.traffic_by_kind(text, chips)
    splash_calls = sum('custom_call_target="tpu_custom_call"' in line and "splash" in line
                       for line in text.splitlines())
    counts = count_parameters(config.model, seq_len=config.data.seq_len)
    per_token = compiler_counted_flops_per_token(config.model, counts, bool(splash_calls))
    # Host-resident tables: the tables and their two float32 moments in host memory.
    table_bytes = ((counts.engram_tables + counts.engram_table_padding)
                   * (jnp.dtype(config.model.param_dtype).itemsize + 8))
    analytic = counts.flops_per_token * tokens_per_chip * remat
    basis = per_token * tokens_per_chip * remat
    return {
        "chips": chips, "device_kind": devices[0].device_kind,
        "mesh": dict(zip(MESH_AXES, config.sharding.axis_sizes(chips))),
        "batch": config.train.batch_size, "seq_len": config.data.seq_len,
        "remat": config.model.remat, "dtype": config.model.dtype,
        "compile_s": round(compile_s, 2),
        **{f"{name}_gib": round(value, 3) for name, value in sizes.items()},
        "total_gib": round(total, 3), "hbm_gib": round(hbm, 2), "fits": total <= hbm,
        "flops_per_chip": float(cost["flops"]), "analytic_flops_per_chip": analytic,
        "analytic_counted_flops_per_chip": basis, "splash_calls": splash_calls,
        "flops_ratio": round(float(cost["flops"]) / basis, 4),
        "collective_bytes_per_chip": {kind: int(b) for kind, b in traffic.items() if b},
        "involuntary_remat": sum(INVOLUNTARY_REMAT in line for line in warnings),
        "table_placement": config.model.engram.table_placement if config.model.engram else None,
        "host_tables_gib": round(table_bytes / GIB, 3) if host_placement(config.model) else 0.0,
    }


def _parse_mesh(text: str | None) -> list[str]:
    """"data=2,fsdp=4" -> sharding overrides; unnamed axes become 1 (data: the rest)."""
    if not text:
        return []
    sizes = {}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        if axis.strip() not in MESH_AXES or not size.strip().lstrip("-").isdigit():
            raise ConfigError(f"--mesh {text!r}: expected axis=size pairs over {MESH_AXES}, "
                              f"got {part!r}")
        sizes[axis.strip()] = int(size)
    return [f"sharding.{axis}={sizes.get(axis, -1 if axis == 'data' else 1)}"
            for axis in MESH_AXES]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engram_jax.aot",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:5]))
    parser.add_argument("--config", required=True, help="YAML file or packaged preset name")
    parser.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:4x4x4")
    parser.add_argument("--batch", type=int, help="global batch (sequences); default: the config's")
    parser.add_argument("--seq-len", type=int, help="sequence length; default: the config's")
    parser.add_argument("--mesh", help="axis sizes, e.g. fsdp=64 or data=8,expert=8 (others 1, "
                        "data the rest); default: the config's")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value settings")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after options
    if __name__ == "__main__":  # a process of its own: keep it off any local accelerator
        jax.config.update("jax_platforms", "cpu")
    try:
        overrides = list(args.overrides) + _parse_mesh(args.mesh)
        overrides += [f"train.batch_size={args.batch}"] if args.batch else []
        overrides += [f"data.seq_len={args.seq_len}"] if args.seq_len else []
        config = load_config(args.config, overrides)
        devices = topology_devices(args.topology)
        result = compile_train_step(config, devices)
    except (ConfigError, FileNotFoundError) as err:
        print(f"engram_jax.aot: {err}", file=sys.stderr)
        return 2
    except DoesNotFit as err:
        print(f"engram_jax.aot: {args.config} does not fit on {args.topology}: {err}",
              file=sys.stderr)
        return 1
    result = {"topology": args.topology, **result}
    print(json.dumps(result), flush=True)
    if not result["fits"]:
        print(f"engram_jax.aot: {args.config} does not fit on {args.topology}: "
              f"{result['total_gib']:.2f} GiB per chip > {result['hbm_gib']:.2f} GiB of HBM",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
