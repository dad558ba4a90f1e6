"""A run directory: what training writes, and how everything else reads it back.

Layout of `train.run_dir`:

  config.yaml     the resolved config the run was started with
  tokenizer/      the tokenizer (`tokenizer.json`, `tokenizer_config.json`)
  checkpoints/    Orbax checkpoints, one directory per step (`engram_jax.train.checkpoint`);
                  each holds the model, the optimiser, the data iterator and `meta` (the
                  resolved config, the tokenizer as JSON, the step)
  metrics.jsonl   one JSON object per logging or evaluation step
  result.json     the final metrics, written when the run reaches `train.steps`
  loss.png        training and validation loss (`python -m engram_jax.plot RUN_DIR`)
  events.*        TensorBoard events (when tensorboardX is installed)

Training writes it (`engram_jax.train.loop`); evaluation, the analysis tools and the experiment
sweeps read it through `RunDir` and `load_trained`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import yaml
from flax import nnx

from engram_jax.config.loader import apply_overrides, config_to_dict, from_dict
from engram_jax.config.schema import Config
from engram_jax.data.tokenizer import TextTokenizer
from engram_jax.nn.model import Transformer
from engram_jax.sharding.mesh import default_mesh, use_mesh
from engram_jax.train.checkpoint import Checkpointer


class RunDir:
    """The files of one run directory (see the module docstring)."""

    CONFIG, TOKENIZER, CHECKPOINTS = "config.yaml", "tokenizer", "checkpoints"
    METRICS, RESULT, LOSS_PLOT = "metrics.jsonl", "result.json", "loss.png"

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)

    @classmethod
    def containing(cls, path: str | pathlib.Path) -> RunDir:
        """The run of a run directory or of its `checkpoints/` directory.

        Raises:
          FileNotFoundError: `path` does not exist.
        """
        path = pathlib.Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {path} does not exist")
        if path.name == cls.CHECKPOINTS and not (path / cls.CHECKPOINTS).is_dir():
            return cls(path.parent)
        return cls(path)

    @property
    def name(self) -> str:
        return self.path.absolute().name

    @property
    def checkpoints(self) -> pathlib.Path:
        return self.path / self.CHECKPOINTS

    @property
    def metrics(self) -> pathlib.Path:
        return self.path / self.METRICS

    @property
    def loss_plot(self) -> pathlib.Path:
        return self.path / self.LOSS_PLOT

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: Config) -> None:
        (self.path / self.CONFIG).write_text(yaml.safe_dump(config_to_dict(config),
                                                            sort_keys=False))

    def write_tokenizer(self, tokenizer: TextTokenizer) -> None:
        tokenizer.save(self.path / self.TOKENIZER)

    def checkpointer(self, keep: int = 3, asynchronous: bool = True) -> Checkpointer:
        return Checkpointer(self.checkpoints, keep=keep, asynchronous=asynchronous)

    def read_metrics(self) -> list[dict]:
        """The rows of `metrics.jsonl`."""
        if not self.metrics.is_file():
            raise FileNotFoundError(f"{self.metrics} does not exist: is {self.path} a training "
                                    "run directory?")
        return [json.loads(line) for line in self.metrics.read_text().splitlines()
                if line.strip()]

    def write_result(self, values: dict) -> None:
        """Writes the final metrics (through a temporary file: never half-written)."""
        staging = self.path / f"{self.RESULT}.tmp"
        staging.write_text(json.dumps(values, indent=1) + "\n")
        staging.rename(self.path / self.RESULT)

    def read_result(self) -> dict | None:
        """The final metrics, or None when the run has not finished."""
        path = self.path / self.RESULT
        return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_meta(config: Config, tokenizer: TextTokenizer, step: int) -> dict:
    """The `meta` item saved with every checkpoint."""
    return {"config": config_to_dict(config), "tokenizer": tokenizer.tokenizer.to_str(),
            "step": step}


@dataclasses.dataclass
class TrainedModel:
    """A model restored from a run, with the config and tokenizer it was trained with."""

    model: Transformer
    config: Config
    tokenizer: TextTokenizer
    step: int
    run: RunDir


def load_trained(path: str | pathlib.Path, data_overrides: list[str] = ()) -> TrainedModel:
    """The model of the newest readable checkpoint of a run (a run directory or its
    `checkpoints/`), with its config (`data.*` overrides applied) and tokenizer.

    Raises:
      FileNotFoundError: no such directory, or it holds no checkpoint.
      RuntimeError: no checkpoint could be read.
    """
    from tokenizers import Tokenizer

    run = RunDir.containing(path)
    checkpointer = run.checkpointer()
    try:
        steps = checkpointer.steps()
        if not steps:
            raise FileNotFoundError(f"{run.checkpoints} holds no checkpoint")
        meta = checkpointer.read_meta(steps[-1])
        config = from_dict(Config, apply_overrides(meta["config"], list(data_overrides)))
        tokenizer = TextTokenizer(Tokenizer.from_str(meta["tokenizer"]),
                                  name=f"{run.path} tokenizer")
        with use_mesh(config.sharding, default_mesh(config.sharding)):
            model = Transformer(config.model, rngs=nnx.Rngs(0))
        restored = checkpointer.restore(model)
        if restored is None:
            raise RuntimeError(f"no checkpoint in {run.checkpoints} could be read")
    finally:
        checkpointer.close()
    return TrainedModel(model, config, tokenizer, restored[0], run)
