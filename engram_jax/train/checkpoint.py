"""Orbax checkpoints of a run: model, optimiser state, data iterator and metadata, per step.

Each step's checkpoint holds four items: `model` and `optimizer` (pure-dict NNX states), `data`
(the grain iterator's state, when given) and `meta` (JSON: the resolved config, the tokenizer,
the step). The model can be restored without the optimiser (evaluation, analysis). Saves are
asynchronous and atomic (Orbax writes a temporary directory and renames it), the last `keep`
are kept, and nothing is overwritten in place. Restoring walks back from the newest checkpoint:
one that cannot be read is reported and the previous one is used.
"""

from __future__ import annotations

import logging
import pathlib
import warnings

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

log = logging.getLogger(__name__)


def _pure_state(obj: nnx.Module | nnx.Optimizer) -> dict:
    return nnx.to_pure_dict(nnx.state(obj))


def _abstract(obj: nnx.Module | nnx.Optimizer) -> dict:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, _pure_state(obj))


def _load_into(obj: nnx.Module | nnx.Optimizer, values: dict) -> None:
    state = nnx.state(obj)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(obj, state)


class Checkpointer:
    """Checkpoints of one run under `directory`."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, asynchronous: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=asynchronous)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer,
             data_iterator, meta: dict) -> None:
        """Starts saving (returns before the write completes when asynchronous)."""
        items = dict(model=ocp.args.StandardSave(_pure_state(model)),
                     optimizer=ocp.args.StandardSave(_pure_state(optimizer)),
                     meta=ocp.args.JsonSave(meta))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int) -> dict:
        """The metadata saved with `step`."""
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def restore(self, model: nnx.Module, optimizer: nnx.Optimizer | None = None,
                data_iterator=None) -> tuple[int, dict] | None:
        """Restores the newest readable checkpoint into the objects given (the model always; the
        optimiser and the data iterator when given); (step, meta) or None."""
        for step in reversed(self.steps()):
            try:
                return step, self._restore(step, model, optimizer, data_iterator)
            except Exception as err:  # a partial or corrupt checkpoint: fall back
                message = (f"checkpoint {self.directory / str(step)} could not be read "
                           f"({type(err).__name__}: {err}); trying the previous one")
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                log.warning(message)
        return None

    def _restore(self, step: int, model, optimizer, data_iterator) -> dict:
        items = dict(model=ocp.args.StandardRestore(_abstract(model)),
                     meta=ocp.args.JsonRestore())
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardRestore(_abstract(optimizer))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        _load_into(model, restored.model)
        if optimizer is not None:
            _load_into(optimizer, restored.optimizer)
        return dict(restored.meta)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
