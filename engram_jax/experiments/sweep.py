"""Shared machinery of the experiment sweeps: configs, one training run per config, CSV rows.

A run's directory is named after the run and a digest of its config, so a run already finished
(by this sweep or another one, under any name) is read back from its `result.json` instead of
being trained again, and an interrupted sweep resumes where it stopped (a half-finished run
resumes from its checkpoint). Presets are the packaged ones (`engram_jax.config.preset_names`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Sequence

from engram_jax.accounting import count_parameters
from engram_jax.config import (Config, ModelConfig, apply_overrides, config_to_dict, from_dict,
                               load_yaml, merge_nested)
from engram_jax.train.run_dir import RunDir

SWEEP_PRESET = "sweep.yaml"


@dataclasses.dataclass(frozen=True)
class Run:
    """One point of a sweep: a unique name, its config, and the CSV columns that describe it."""

    name: str
    config: Config
    fields: dict


def sweep_config(model_preset: str, overrides: Sequence[str] = ()) -> Config:
    """The preset `model_preset` with the `sweep.yaml` preset's data and training settings over
    it, then dotted `overrides` (e.g. "train.seed=1")."""
    values = merge_nested(load_yaml(model_preset), load_yaml(SWEEP_PRESET))
    return from_dict(Config, apply_overrides(values, list(overrides)))


def with_model(config: Config, model: ModelConfig) -> Config:
    return dataclasses.replace(config, model=model)


def with_engram(config: Config, **changes) -> Config:
    """`config` with its Engram settings changed (e.g. gated=False)."""
    engram = dataclasses.replace(config.model.engram, **changes)
    return with_model(config, dataclasses.replace(config.model, engram=engram))


def with_seed(config: Config, seed: int) -> Config:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))


def config_digest(config: Config) -> str:
    """10 hex digits identifying everything about a run except where it is stored."""
    values = config_to_dict(config)
    values["train"].pop("run_dir")
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


def run_one(run: Run, runs_root: pathlib.Path, progress: bool = True) -> dict:
    """Trains `run` (or reads its finished result) and returns its CSV row."""
    from engram_jax.train.loop import train

    digest = config_digest(run.config)
    finished = sorted(runs_root.glob(f"*-{digest}/{RunDir.RESULT}"))  # maybe under another name
    run_dir = RunDir(finished[0].parent if finished else runs_root / f"{run.name}-{digest}")
    result = run_dir.read_result()
    if result is not None:
        print(f"{run.name}: finished earlier, read {run_dir.path / RunDir.RESULT}", flush=True)
    else:
        print(f"{run.name}: training in {run_dir.path}", flush=True)
        config = dataclasses.replace(
            run.config, train=dataclasses.replace(run.config.train, run_dir=str(run_dir.path)))
        train(config, progress=progress)
        result = run_dir.read_result()
        if result is None:
            raise RuntimeError(f"{run.name}: the run in {run_dir.path} stopped before its last "
                               "step; run the sweep again to resume it")
    counts = count_parameters(run.config.model, seq_len=run.config.data.seq_len)
    return {"name": run.name, **run.fields, "seed": run.config.train.seed,
            "params_total": counts.total, "params_active": counts.active,
            "params_routed_experts": counts.routed_experts,
            "params_engram_tables": counts.engram_tables,
            "val_loss": result["val_loss"], "val_bits_per_byte": result["val_bits_per_byte"],
            "train_loss": result["loss"], "unigram_loss": result["unigram_loss"],
            "wall_s": round(result["wall_s"], 1), "run_dir": str(run_dir.path)}


def run_sweep(runs: Sequence[Run], out_dir: pathlib.Path, runs_root: pathlib.Path,
              progress: bool = True) -> list[dict]:
    """Runs every point in order, rewriting `out_dir/runs.csv` after each one."""
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names repeat: {names}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, run in enumerate(runs):
        print(f"[{i + 1}/{len(runs)}] ", end="", flush=True)
        rows.append(run_one(run, runs_root, progress))
        write_csv(rows, out_dir / "runs.csv")
    return rows


def write_csv(rows: Sequence[dict], path: pathlib.Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def parser(description: str) -> argparse.ArgumentParser:
    """The command line every sweep shares."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results", help="where results/<experiment>/ goes")
    p.add_argument("--runs", default="runs/experiments", help="where run directories go")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*",
                   help="dotted.key=value settings applied to every run (e.g. train.steps=400)")
    return p



def summarise(rows: Sequence[dict], by: str, metrics: Sequence[str] = ("val_loss",
              "val_bits_per_byte")) -> list[dict]:
    """Mean, sample standard deviation and count of `metrics` per value of column `by`, in
    first-seen order; parameter counts are carried over from the group's first row."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[by], []).append(row)
    out = []
    for key, members in groups.items():
        summary = {by: key, "runs": len(members),
                   "params_total": members[0]["params_total"],
                   "params_active": members[0]["params_active"]}
        for metric in metrics:
            values = [float(m[metric]) for m in members]
            mean = sum(values) / len(values)
            spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(
                values) > 1 else 0.0
            summary[f"{metric}_mean"], summary[f"{metric}_std"] = mean, spread
        out.append(summary)
    return out


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """`rows` as a Markdown table of `columns` (floats to 4 decimals)."""
    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(
            value, int) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def training_curve(run_dir: str | pathlib.Path) -> tuple[list[int], list[float]]:
    """(steps, training losses) from a run's metrics.jsonl."""
    rows = [r for r in RunDir(run_dir).read_metrics() if "loss" in r]
    return [r["step"] for r in rows], [r["loss"] for r in rows]
