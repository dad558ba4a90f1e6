"""Orbax checkpoints of a run: model, optimiser state, data iterator and metadata, per step.

Each step's checkpoint holds four items: `model` and `optimizer` (pure-dict NNX states), `data`
(the grain iterator's state, when given) and `meta` (JSON: the resolved config, the tokenizer,
the step), and a fifth with host-resident Engram tables: `host_tables` (the tables and their
moments, `engram_jax.train.host_tables.HostTableOptimizer.state`). The model can be restored without the optimiser (evaluation, analysis). Saves are
asynchronous and atomic (Orbax writes a temporary directory and renames it), the last `keep`
are kept, and nothing is overwritten in place. Restoring walks back from the newest checkpoint:
one that cannot be read is reported, renamed `<step>.unreadable` (kept, out of the way of the
step that will be saved again) and the previous one is used.
"""

from __future__ import annotations

import logging
import pathlib
import warnings

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from engram_jax.config.schema import ConfigError

log = logging.getLogger(__name__)


class CheckpointMismatch(ConfigError):
    """A readable checkpoint holds parameters of other shapes than the model (not corrupt)."""


def _without_empty(tree: dict) -> dict:
    """`tree` without its arrays of no elements (the (0, head_dim) placeholders of host-resident
    tables), which hold nothing and which Orbax does not write."""
    kept = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            kept[key] = _without_empty(value)
        elif getattr(value, "size", 1):
            kept[key] = value
    return kept


def _pure_state(obj: nnx.Module | nnx.Optimizer) -> dict:
    return _without_empty(nnx.to_pure_dict(nnx.state(obj)))


def _abstract(obj: nnx.Module | nnx.Optimizer) -> dict:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, _pure_state(obj))


def _load_into(obj: nnx.Module | nnx.Optimizer, values: dict) -> None:
    state = nnx.state(obj)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(obj, state)


class Checkpointer:
    """Checkpoints of one run under `directory`."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, asynchronous: bool = True,
                 create: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=asynchronous)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer,
             data_iterator, meta: dict, host_tables=None) -> None:
        """Starts saving (returns before the write completes when asynchronous); `host_tables`
        a `HostTableOptimizer` or None."""
        items = dict(model=ocp.args.StandardSave(_pure_state(model)),
                     optimizer=ocp.args.StandardSave(_pure_state(optimizer)),
                     meta=ocp.args.JsonSave(meta))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if host_tables is not None:
            items["host_tables"] = ocp.args.StandardSave(host_tables.state())
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int) -> dict:
        """The metadata saved with `step`."""
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def newest_meta(self) -> tuple[int, dict] | None:
        """(step, metadata) of the newest checkpoint whose metadata can be read, or None;
        unreadable ones are reported."""
        for step in reversed(self.steps()):
            try:
                return step, self.read_meta(step)
            except Exception as err:  # a partial or corrupt checkpoint: fall back
                _report_unreadable(self.directory / str(step), err)
        return None

    def restore(self, model: nnx.Module, optimizer: nnx.Optimizer | None = None,
                data_iterator=None, set_aside: bool = False,
                host_tables=None) -> tuple[int, dict] | None:
        """Restores the newest readable checkpoint into the objects given (the model always; the
        optimiser, the data iterator and the `HostTableOptimizer` when given); (step, meta) or
        None. With `set_aside`, the unreadable checkpoints newer than it are renamed
        `<step>.unreadable`, so that training can save those steps again."""
        unreadable = []
        for step in reversed(self.steps()):
            try:
                restored = step, self._restore(step, model, optimizer, data_iterator,
                                               host_tables)
            except CheckpointMismatch:
                raise
            except Exception as err:  # a partial or corrupt checkpoint: fall back
                _report_unreadable(self.directory / str(step), err)
                unreadable.append(step)
                continue
            if set_aside and unreadable:
                self._set_aside(unreadable)
            return restored
        return None

    def _set_aside(self, steps: list[int]) -> None:
        for step in steps:
            path = self.directory / str(step)
            target = path.with_name(f"{step}.unreadable")
            suffix = 1
            while target.exists():
                target, suffix = path.with_name(f"{step}.unreadable{suffix}"), suffix + 1
            path.rename(target)
            log.warning("moved the unreadable checkpoint %s to %s", path, target)
        self.manager.reload()

    def check_shapes(self, step: int, model: nnx.Module) -> None:
        """Raises CheckpointMismatch when the stored model's shapes differ from `model`'s (an
        unreadable metadata file is left to the restore, which falls back)."""
        try:
            stored = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "model")
        except Exception:  # noqa: BLE001 - unreadable: the restore reports it
            return
        has_shape = lambda x: hasattr(x, "shape")
        name = lambda path: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        shapes = lambda tree: {name(path): tuple(leaf.shape) for path, leaf in
                               jax.tree_util.tree_leaves_with_path(tree, is_leaf=has_shape)}
        before, now = shapes(stored), shapes(_abstract(model))
        changed = [f"{k}: {before.get(k)} -> {now.get(k)}" for k in sorted(set(before) | set(now))
                   if before.get(k) != now.get(k)]
        if changed:
            cause = "it was written by another model or code version"
            stacked_before, stacked_now = _stacked_runs(before), _stacked_runs(now)
            if stacked_before and stacked_now and stacked_before != stacked_now:
                cause = (f"its blocks are stacked in other runs (entries {sorted(stacked_before)} "
                         f"of blocks, here {sorted(stacked_now)}): it was written by a version "
                         "in which Engram layers were blocks of their own beside the stacked "
                         "runs, or by another model; restore it with the version that wrote it")
            elif stacked_before != stacked_now:
                cause = ("its blocks are stored in the other layout of model.scan_layers "
                         "(stacked runs of blocks, or one entry per block); restore it with "
                         "model.scan_layers set as when it was written")
            raise CheckpointMismatch(
                f"checkpoint {self.directory / str(step)} holds parameters of other shapes than "
                f"this model ({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''}): "
                f"{cause}; it is left as it is")

    def _restore(self, step: int, model, optimizer, data_iterator, host_tables) -> dict:
        self.check_shapes(step, model)
        items = dict(model=ocp.args.StandardRestore(_abstract(model)),
                     meta=ocp.args.JsonRestore())
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardRestore(_abstract(optimizer))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        if host_tables is not None:
            items["host_tables"] = ocp.args.StandardRestore(host_tables.restore_target())
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        _load_into(model, restored.model)
        if optimizer is not None:
            _load_into(optimizer, restored.optimizer)
        if host_tables is not None:
            host_tables.load_state(restored.host_tables)
        return dict(restored.meta)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _stacked_runs(paths) -> set[int]:
    """The entries of `blocks` that hold a stacked run (`model.scan_layers`), from state paths."""
    return {int(p.split("/")[1]) for p in paths
            if p.startswith("blocks/") and p.count("/") > 2 and p.split("/")[2] == "layers"}


def _report_unreadable(path: pathlib.Path, err: Exception) -> None:
    message = (f"checkpoint {path} could not be read ({type(err).__name__}: {err}); trying the "
               "previous one")
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    log.warning(message)
