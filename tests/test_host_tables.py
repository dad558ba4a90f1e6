"""Host-resident Engram tables in training (`engram.table_placement: host`): the device holds no
table, the host tables start and train as device tables with `sparse_adam` do (the read-ahead
batch patched where an update changed its rows), on one device and on a mesh, and the tables,
their moments and the data position are checkpointed together."""

import dataclasses
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from engram_jax.config import Config, ConfigError, ShardingConfig, TrainConfig, load_model_config
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.data.hashing import NgramHasher
from engram_jax.sharding import global_batch, make_mesh, use_mesh
from engram_jax.sharding.mesh import check_layout
from engram_jax.train.checkpoint import Checkpointer
from engram_jax.train.host_tables import HostRowFeed, HostTableOptimizer, with_device_tables
from engram_jax.train.step import create_train_state, jitted_train_step, train_step

TINY = load_model_config(pathlib.Path(__file__).parent.parent / "configs" / "tiny.yaml")
TRAIN = TrainConfig(warmup_steps=0, schedule="constant", learning_rate=1e-2,
                    table_optimizer="sparse_adam")


def _config(placement: str, scan_layers: bool = True, num_layers: int = 4) -> Config:
    """tiny with its Engram layer (block 1) in a scanned run of blocks 1-3 by default."""
    engram = dataclasses.replace(TINY.engram, table_placement=placement)
    model = dataclasses.replace(TINY, num_layers=num_layers, scan_layers=scan_layers,
                                engram=engram)
    return Config(model=model, train=TRAIN)


def _batches(count: int, rows: int = 8, length: int = 16) -> list[dict]:
    """Random batches over a few tokens, so that consecutive steps share table rows."""
    hasher = NgramHasher(TINY.engram, CompressedTokenizer.identity(TINY.vocab_size))
    out = []
    for seed in range(count):
        tokens = np.random.default_rng(seed).integers(0, 24, (rows, length + 1)).astype(np.int32)
        out.append({"tokens": tokens, "hash_ids": hasher(tokens[:, :-1])})
    return out


def _feed(batches: list[dict], tables: HostTableOptimizer) -> HostRowFeed:
    return HostRowFeed(iter(grain.MapDataset.source(batches).to_iter_dataset()), tables)


def _on(mesh, batch: dict) -> dict:
    return jax.tree.map(lambda x: global_batch(np.asarray(x), mesh), batch)


def test_host_tables_need_sparse_adam_and_one_process():
    with pytest.raises(ConfigError, match="model.engram.table_placement='host'.*sparse_adam"):
        dataclasses.replace(_config("host"), train=TrainConfig())
    with pytest.raises(ConfigError, match="table_placement='host' runs in one process"):
        check_layout(_config("host"), 8, 2)
    with pytest.raises(ConfigError, match="engram.table_placement='disk': must be one of"):
        dataclasses.replace(TINY.engram, table_placement="disk")


def test_the_model_holds_no_table_and_asks_for_rows():
    model, optimizer = create_train_state(_config("host"))
    (engram,) = model.engram_modules().values()
    assert engram.table.shape == (0, TINY.engram.head_dim)
    assert len(optimizer.mu) == 0 and len(optimizer.nu) == 0  # the moments are the host's
    batch = _batches(1)[0]
    with pytest.raises(ValueError, match="lives on the host .* pass its rows"):
        model.next_token_nll(jnp.asarray(batch["tokens"]), batch["hash_ids"])


def _table_shaped(config: Config, batch: dict) -> bool:
    """Whether the train step's program holds a float array of a full table's shape."""
    model, optimizer = create_train_state(config)
    shapes = {(e.layout.padded_rows, e.config.head_dim) for e in model.engram_modules().values()}
    graphdef, state = nnx.split((model, optimizer))

    def step(state, batch):
        return train_step(*nnx.merge(graphdef, state), batch, 1)

    jaxpr = jax.make_jaxpr(step)(state, batch)
    text = str(jaxpr)
    return any(f"f32[{rows},{width}]" in text for rows, width in shapes)


def test_the_device_step_builds_nothing_of_a_tables_size():
    batch = _batches(1, rows=4)[0]  # 256 ids: the rows' arrays are not the table's 512 rows
    assert _table_shaped(_config("device"), batch)  # the check sees a device table
    tables = HostTableOptimizer(create_train_state(_config("host"))[0], TRAIN)
    assert not _table_shaped(_config("host"), {**batch, "rows": tables.gather(batch["hash_ids"])})


def _train_both(scan_layers: bool, sharding: ShardingConfig | None, steps: int = 4,
                num_layers: int = 4):
    """`steps` trainer steps with device tables and with host tables (through the feed, as the
    loop drives it); the losses of both, the tables and moments after, and how many read-ahead
    rows an update had made stale."""
    batches = _batches(steps + 1)
    mesh = make_mesh(sharding) if sharding is not None else None
    with use_mesh(sharding, mesh):
        device_model, device_optimizer = create_train_state(
            _config("device", scan_layers, num_layers))
        host_model, host_optimizer = create_train_state(_config("host", scan_layers, num_layers))
    tables = HostTableOptimizer(host_model, TRAIN)
    for layer, engram in device_model.engram_modules().items():  # the same initial tables
        np.testing.assert_array_equal(np.asarray(engram.table[...]), tables.tables.tables[layer])
    feed, losses, stale = _feed(batches, tables), [], 0
    for step in range(steps):
        batch = next(feed)
        with use_mesh(sharding, mesh):
            device = jitted_train_step(device_model, device_optimizer,
                                       _on(mesh, {k: batch[k] for k in ("tokens", "hash_ids")}), 1)
            host = jitted_train_step(host_model, host_optimizer, _on(mesh, batch), 1)
        table_step = host.pop("host_table_step")
        feed.read_ahead()
        ahead = feed._ahead[1]
        before = jax.tree.map(np.copy, ahead["rows"])
        feed.patch(tables.apply(table_step))
        fresh = tables.gather(ahead["hash_ids"])  # what the next step must see
        for layer in fresh:
            np.testing.assert_array_equal(ahead["rows"][layer], fresh[layer])
            stale += int(np.sum(np.any(before[layer] != fresh[layer], axis=-1)))
        losses.append((float(device["loss"]), float(host["loss"])))
    device_state = {layer: (np.asarray(e.table[...]), np.asarray(device_optimizer.mu[str(layer)][...]),
                            np.asarray(device_optimizer.nu[str(layer)][...]))
                    for layer, e in device_model.engram_modules().items()}
    host_state = {layer: (tables.tables.tables[layer], tables.mu[layer], tables.nu[layer])
                  for layer in device_state}
    return losses, device_state, host_state, stale


@pytest.mark.parametrize("scan_layers", [True, False])
def test_host_tables_train_as_device_tables_step_for_step(scan_layers):
    losses, device_state, host_state, stale = _train_both(scan_layers, None)
    assert stale > 0  # the updates did change rows of read-ahead batches: the patch mattered
    np.testing.assert_allclose(*zip(*losses), rtol=1e-5)
    for layer, arrays in device_state.items():
        for got, want in zip(host_state[layer], arrays):
            # Float32 rounding of two differently fused Adams grows with the steps (on one x86
            # host, 4e-5 in a few of 4096 values); the next line bounds the worst of it.
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        assert np.abs(host_state[layer][0] - arrays[0]).max() < 1e-3
        assert np.abs(host_state[layer][2]).max() > 0  # trained


def test_host_tables_on_a_mesh_train_as_device_tables():
    """The batch (and its rows) split over 8 devices, device tables split by rows over them."""
    losses, device_state, host_state, _ = _train_both(
        False, ShardingConfig(data=2, fsdp=4), steps=2, num_layers=2)
    np.testing.assert_allclose(*zip(*losses), rtol=1e-5)
    for layer, arrays in device_state.items():
        for got, want in zip(host_state[layer], arrays):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_the_tables_moments_and_data_position_are_checkpointed(tmp_path):
    batches = _batches(4)
    model, optimizer = create_train_state(_config("host"))
    tables = HostTableOptimizer(model, TRAIN)
    feed = _feed(batches, tables)
    for _ in range(2):
        metrics = jitted_train_step(model, optimizer, next(feed), 1)
        table_step = metrics.pop("host_table_step")
        feed.read_ahead()
        feed.patch(tables.apply(table_step))
    checkpointer = Checkpointer(tmp_path, asynchronous=True)
    checkpointer.save(2, model, optimizer, feed, {}, tables)
    saved = tables.state()
    tables.apply(table_step)  # changes the arrays while the save may still be writing
    checkpointer.close()
    fresh_model, fresh_optimizer = create_train_state(_config("host"))
    fresh_tables = HostTableOptimizer(fresh_model, TRAIN)
    fresh_feed = _feed(batches, fresh_tables)
    step, _ = Checkpointer(tmp_path).restore(fresh_model, fresh_optimizer, fresh_feed,
                                             host_tables=fresh_tables)
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, fresh_tables.state(), saved)
    assert np.abs(saved["nu"]["1"]).max() > 0
    np.testing.assert_array_equal(next(fresh_feed)["tokens"], batches[2]["tokens"])
    # The model as evaluation and decoding get it: the host tables on the device.
    device_model = with_device_tables(fresh_model, fresh_tables.tables)
    (engram,) = device_model.engram_modules().values()
    assert device_model.config.engram.table_placement == "device"
    np.testing.assert_array_equal(np.asarray(engram.table[...]), saved["tables"]["1"])
    tokens = jnp.asarray(batches[3]["tokens"])
    rows = fresh_tables.gather(batches[3]["hash_ids"])
    np.testing.assert_allclose(device_model.next_token_nll(tokens, batches[3]["hash_ids"]),
                               fresh_model.next_token_nll(tokens, batches[3]["hash_ids"],
                                                          rows=rows), rtol=1e-6)
