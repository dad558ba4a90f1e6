"""A run directory: what training writes, and how everything else reads it back.

Layout of `train.run_dir`:

  config.yaml     the resolved config the run was started with
  config-stepN.yaml  the config of a resume at step N, when it differs from those before
  tokenizer/      the tokenizer (`tokenizer.json`, `tokenizer_config.json`)
  checkpoints/    Orbax checkpoints, one directory per step (`engram_jax.train.checkpoint`);
                  each holds the model, the optimiser, the data iterator and `meta` (the
                  resolved config, the tokenizer and its sha256, a fingerprint of the data,
                  the step)
  metrics.jsonl   one JSON object per logging or evaluation step (step 0: the data's counts
                  and the unigram baseline)
  result.json     the final metrics, written when the run reaches `train.steps`
  loss.png        training and validation loss (`python -m engram_jax.plot RUN_DIR`)
  events.*        TensorBoard events (when tensorboardX is installed)

Nothing is overwritten in place. Training writes it (`engram_jax.train.loop`); evaluation, the
analysis tools and the experiment sweeps read it through `RunDir` and `load_trained`.

Resuming (`resume_point`): a run directory with checkpoints continues from the newest readable
one, with the tokenizer stored in it, only when the config is the same except for the keys of
`SAFE_ON_RESUME`; any other difference is refused with the list of keys, unless
`train.resume: allow`. `train.resume: must` refuses to start a new run, `never` to continue one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import yaml
from flax import nnx

from engram_jax.config.loader import apply_overrides, config_to_dict, from_dict
from engram_jax.config.schema import Config, ConfigError
from engram_jax.data.tokenizer import TextTokenizer, load_tokenizer
from engram_jax.nn.model import Transformer
from engram_jax.sharding.mesh import default_mesh, use_mesh
from engram_jax.train.checkpoint import Checkpointer
from engram_jax.train.host_tables import HostTableOptimizer, host_placement, with_device_tables


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

    def create(self, config: Config, tokenizer: TextTokenizer, resumed_at: int = 0) -> None:
        """Makes the directory and writes the config and the tokenizer, each only once: a resume
        at step N whose config differs from those before writes `config-step<N>.yaml` beside."""
        self.path.mkdir(parents=True, exist_ok=True)
        name = self.CONFIG if not (self.path / self.CONFIG).exists() else (
            f"config-step{resumed_at}.yaml")
        text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
        previous = [p.read_text() for p in sorted(self.path.glob("config*.yaml"))]
        if text not in previous and not (self.path / name).exists():
            (self.path / name).write_text(text)
        if not (self.path / self.TOKENIZER).exists():
            tokenizer.save(self.path / self.TOKENIZER)

    def checkpoint_steps(self) -> list[int]:
        """Steps with a checkpoint directory (read from the file system: creates nothing)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit())

    def checkpointer(self, keep: int = 3) -> Checkpointer:
        return Checkpointer(self.checkpoints, keep=keep)

    def read_metrics(self) -> list[dict]:
        """The rows of `metrics.jsonl`."""
        if not self.metrics.is_file():
            raise FileNotFoundError(f"{self.metrics} does not exist: is {self.path} a training "
                                    "run directory?")
        return [json.loads(line) for line in self.metrics.read_text().splitlines()
                if line.strip()]

    def write_result(self, values: dict) -> None:
        """Writes the final metrics (through a temporary file: never half-written); the result
        of an earlier end of the run (before `train.steps` was raised) is kept as
        `result-step<N>.json`."""
        path, earlier = self.path / self.RESULT, self.read_result()
        if earlier is not None and earlier.get("step") != values.get("step"):
            path.rename(self.path / f"result-step{earlier.get('step')}.json")
        staging = self.path / f"{self.RESULT}.tmp{os.getpid()}"
        staging.write_text(json.dumps(values, indent=1) + "\n")
        staging.rename(path)

    def read_result(self) -> dict | None:
        """The final metrics, or None when the run has not finished."""
        path = self.path / self.RESULT
        return json.loads(path.read_text()) if path.is_file() else None

    def final_metrics(self, step: int) -> dict | None:
        """The final metrics of a run that reached `step`: `result.json`, else rebuilt (and
        written) from `metrics.jsonl` when its rows of `step` hold a validation loss (a run
        stopped between its last checkpoint and `result.json`); None otherwise."""
        result = self.read_result()
        if result is not None and result.get("step") == step:
            return result
        if not self.metrics.is_file():
            return None
        rows = self.read_metrics()
        final = {k: v for r in rows if r["step"] == step for k, v in r.items()}
        if "val_loss" not in final:
            return None
        start = {k: v for r in rows if r["step"] == 0 for k, v in r.items()}
        final["unigram_loss"] = start.get("unigram_loss")
        self.write_result(final)
        return final


# Settings a run may change when it is resumed: how long it runs (and so the length of the
# learning-rate schedule), what it logs and evaluates, how often it checkpoints, where the
# pipeline's threads and caches are. Anything else changes the model, the optimiser or the data
# stream, and is refused unless `train.resume: allow`.
SAFE_ON_RESUME = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                  "train.checkpoint_every", "train.keep_checkpoints", "train.run_dir",
                  "train.peak_flops", "train.resume", "data.num_threads", "data.prefetch",
                  "data.cache_dir")


class ResumeError(ConfigError):
    """A run directory cannot be continued with this config."""


def checkpoint_meta(config: Config, tokenizer: TextTokenizer, data: dict, step: int) -> dict:
    """The `meta` item saved with every checkpoint: config, tokenizer, data fingerprint, step."""
    return {"config": config_to_dict(config),
            "tokenizer": {"json": tokenizer.tokenizer.to_str(), "options": tokenizer.options(),
                          "sha256": tokenizer.fingerprint()},
            "data": data, "step": step}


def tokenizer_of(meta: dict, name: str) -> TextTokenizer:
    """The tokenizer stored in a checkpoint's meta (earlier checkpoints hold only its JSON)."""
    from tokenizers import Tokenizer

    stored = meta["tokenizer"]
    if isinstance(stored, str):
        return TextTokenizer(Tokenizer.from_str(stored), name=name)
    return TextTokenizer(Tokenizer.from_str(stored["json"]), name=name, **stored["options"])


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict, config: Config) -> list[str]:
    """`key: saved -> now` for every dotted key outside `SAFE_ON_RESUME` that differs."""
    before, now = _flat(saved), _flat(config_to_dict(config))
    keys = sorted((set(before) | set(now)) - set(SAFE_ON_RESUME))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys
            if before.get(k) != now.get(k)]


@dataclasses.dataclass
class ResumePoint:
    """Where a run continues: the newest readable checkpoint's step, its meta and tokenizer."""

    step: int
    meta: dict
    tokenizer: TextTokenizer
    changed: list[str]  # config differences that `train.resume: allow` accepted

    def check_data(self, fingerprint: dict, allow: bool) -> None:
        """Refuses a data stream other than the one the checkpoint was trained on."""
        saved = self.meta.get("data")
        if saved is None or saved == fingerprint or allow:
            return
        diffs = [f"{k}: {saved.get(k)!r} -> {fingerprint.get(k)!r}" for k in sorted(fingerprint)
                 if saved.get(k) != fingerprint.get(k)]
        raise ResumeError(f"the data differs from the data the checkpoint at step {self.step} "
                          f"was trained on ({'; '.join(diffs)}): start a new run with "
                          "train.run_dir=..., or continue anyway with train.resume=allow")


def resume_point(run: RunDir, config: Config) -> ResumePoint | None:
    """The checkpoint `config` continues in `run`, or None for a new run.

    Raises:
      ResumeError: `train.resume` forbids it (`must` without a checkpoint, `never` with one),
        no checkpoint can be read, or the config differs outside `SAFE_ON_RESUME` (listing the
        keys) and `train.resume` is not `allow`.
      CheckpointMismatch: the checkpoint's parameters have other shapes than this model's.
    """
    policy, steps = config.train.resume, run.checkpoint_steps()
    if not steps:
        if policy == "must":
            raise ResumeError(f"train.resume=must, but {run.checkpoints} holds no checkpoint")
        return None
    if policy == "never":
        raise ResumeError(f"train.run_dir={str(run.path)!r} already holds checkpoints (up to "
                          f"step {steps[-1]}) and train.resume=never: choose a new "
                          "train.run_dir")
    checkpointer = Checkpointer(run.checkpoints, create=False)
    try:
        newest = checkpointer.newest_meta()
        if newest is None:
            raise ResumeError(f"no checkpoint in {run.checkpoints} can be read; move it away or "
                              "choose a new train.run_dir")
        step, meta = newest
        changed = config_differences(meta["config"], config)
        if changed and policy != "allow":
            listing = "\n  ".join(changed)
            raise ResumeError(f"{run.path} was trained with another config; these keys differ "
                              f"from its checkpoint at step {step}:\n  {listing}\nStart a new "
                              "run with train.run_dir=..., or continue this one anyway with "
                              f"train.resume=allow (safe to change: {', '.join(SAFE_ON_RESUME)})")
        checkpointer.check_shapes(step, nnx.eval_shape(
            lambda: Transformer(config.model, rngs=nnx.Rngs(0))))
    finally:
        checkpointer.close()
    return ResumePoint(step, meta, tokenizer_of(meta, f"{run.path} tokenizer"), changed)


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
    `checkpoints/`), with its config (`data.*` overrides applied) and tokenizer. A run trained
    with host-resident tables gives a model that holds them (`engram.table_placement: device`
    in `model.config`); decoding can move them back to the host (`engram_tables="host"`).

    Raises:
      FileNotFoundError: no such directory, it holds no checkpoint, or no tokenizer (neither in
        the checkpoint nor in the run's `tokenizer/`).
      RuntimeError: no checkpoint could be read.
    """
    run = RunDir.containing(path)
    if not run.checkpoint_steps():
        raise FileNotFoundError(f"{run.checkpoints} holds no checkpoint")
    checkpointer = Checkpointer(run.checkpoints, create=False)
    try:
        newest = checkpointer.newest_meta()
        if newest is None:
            raise RuntimeError(f"no checkpoint in {run.checkpoints} could be read")
        step, meta = newest
        config = from_dict(Config, apply_overrides(meta["config"], list(data_overrides)))
        if "tokenizer" in meta:
            tokenizer = tokenizer_of(meta, f"{run.path} tokenizer")
        elif (run.path / RunDir.TOKENIZER).is_dir():
            tokenizer = load_tokenizer(run.path / RunDir.TOKENIZER)
        else:
            raise FileNotFoundError(f"the checkpoint at step {step} of {run.path} holds no "
                                    f"tokenizer and {run.path / RunDir.TOKENIZER} does not "
                                    "exist: copy the tokenizer the run was trained with there")
        with use_mesh(config.sharding, default_mesh(config.sharding)):
            model = Transformer(config.model, rngs=nnx.Rngs(0))
        tables = HostTableOptimizer(model, config.train) if host_placement(config.model) else None
        restored = checkpointer.restore(model, host_tables=tables)
        if restored is None:
            raise RuntimeError(f"no checkpoint in {run.checkpoints} could be read")
    finally:
        checkpointer.close()
    if tables is not None:
        model = with_device_tables(model, tables.tables)
    return TrainedModel(model, config, tokenizer, restored[0], run)
