"""The training loop: `train(config)` runs (or resumes) a run in `config.train.run_dir`.

Set-up first, so that every problem is found before any work: the config against the devices,
the run directory (a finished run returns its final metrics; a run to continue must match its
checkpoint's config, `engram_jax.train.run_dir.resume_point`), then the data, tokenised with the
run's own tokenizer when it continues. Then one loop: the jitted `train_step` on each batch, and
its hooks: metrics every `train.log_every` steps, validation every `train.eval_every`, a
checkpoint every `train.checkpoint_every` and on SIGTERM. What the run directory holds is
`engram_jax.train.run_dir`.
"""

from __future__ import annotations

import time
import warnings

import jax
import numpy as np
from tqdm import tqdm

from engram_jax.accounting import count_parameters
from engram_jax.config.schema import Config, ConfigError
from engram_jax.data.corpus import DataError
from engram_jax.data.pipeline import make_hasher, training_batches, unigram_cross_entropy
from engram_jax.data.prepare import PreparedData, data_fingerprint, prepare_data
from engram_jax.sharding.mesh import check_layout, default_mesh, use_mesh
from engram_jax.train.evaluation import evaluate_sources, to_device
from engram_jax.train.host_tables import HostRowFeed, HostTableOptimizer, host_placement
from engram_jax.train.metrics import (MetricsWriter, RowUsage, TrainLogger, device_peak_flops,
                                      plot_run)
from engram_jax.train.optimizer import learning_rate_schedule
from engram_jax.train.run_dir import (ResumeError, ResumePoint, RunDir, checkpoint_meta,
                                      resume_point)
from engram_jax.train.signals import StopSignals
from engram_jax.train.step import create_train_state, jitted_train_step


def _evaluation_batches(config: Config, data: PreparedData) -> dict[str, int]:
    """Per source ("" for a lone one), `train.eval_batches` clamped (with a warning) to the
    batches its validation split holds.

    Raises:
      DataError: a training or validation split holds less than one batch.
    """
    counts = {}
    for part in data.parts:
        where = f"source {part.name!r}'s" if part.name else "the"
        if len(part.train) < config.train.batch_size:
            raise DataError(f"data: {where} training split holds {len(part.train)} sequences "
                            f"of {config.data.seq_len + 1} tokens, fewer than one batch of "
                            f"train.batch_size={config.train.batch_size}")
        windows = len(part.validation)
        available = windows // config.train.batch_size
        if available == 0:
            raise DataError(f"data: {where} validation split holds {windows} sequences of "
                            f"{config.data.seq_len + 1} tokens, fewer than one batch of "
                            f"train.batch_size={config.train.batch_size}; raise "
                            "data.validation_percent or add documents")
        if config.train.eval_batches > available:
            warnings.warn(f"train.eval_batches={config.train.eval_batches} is more than the "
                          f"{available} batches of {where} validation split: evaluating on "
                          f"{available}", RuntimeWarning, stacklevel=3)
        counts[part.name] = min(config.train.eval_batches, available)
    return counts


def _prepare(config: Config, resume: ResumePoint | None, say,
             progress: bool) -> tuple[PreparedData, dict]:
    """Reads and tokenises the data (with the run's own tokenizer when it continues) and checks
    it against the run and the model; returns it with its fingerprint."""
    for change in resume.changed if resume else ():
        say(f"train.resume=allow: {change}")
    data = prepare_data(config.data, progress=progress,
                        tokenizer=resume.tokenizer if resume else None)
    fingerprint = data_fingerprint(data)
    if resume:
        resume.check_data(fingerprint, allow=config.train.resume == "allow")
    if len(data.tokenizer) > config.model.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                          f"tokenizer's {len(data.tokenizer)} ids")
    return data, fingerprint


def train(config: Config, progress: bool = True) -> dict:
    """Runs (or resumes) training; returns the final metrics (see the module docstring)."""
    clock, cfg = time.perf_counter(), config.train
    run, is_main = RunDir(cfg.run_dir), jax.process_index() == 0
    say = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)
    check_layout(config, jax.device_count(), jax.process_count())
    resume = resume_point(run, config)
    if resume and resume.step >= cfg.steps and (final := run.final_metrics(resume.step)):
        say(f"{run.path} finished at step {resume.step}: validation loss "
            f"{final['val_loss']:.4f}; nothing to do (raise train.steps to continue)")
        return final
    data, fingerprint = _prepare(config, resume, say, progress and is_main)
    tokens = [(part.train.tokens, part.validation.tokens) for part in data.parts]
    say(f"data: {data.report.summary()}; {sum(t for t, _ in tokens):,} training and "
        f"{sum(v for _, v in tokens):,} validation tokens"
        + (f" from {len(data.parts)} sources" if data.is_mixture else ""))
    eval_counts = _evaluation_batches(config, data)
    hasher = make_hasher(config, data.tokenizer, data.eod_id)
    if is_main:
        run.create(config, data.tokenizer, resume.step if resume else 0)
    mesh = default_mesh(config.sharding)
    train_batches, validation_batches = training_batches(config, data, hasher)
    iterator = iter(train_batches)
    with use_mesh(config.sharding, mesh):
        model, optimizer = create_train_state(config)
    tables = HostTableOptimizer(model, cfg) if host_placement(config.model) else None
    if tables is not None:
        iterator = HostRowFeed(iterator, tables)
        say(f"Engram tables in host memory: {tables.nbytes / 2**20:,.1f} MiB with their moments")
    counts = count_parameters(config.model, seq_len=config.data.seq_len)
    say(f"model: {counts.total:,} parameters ({counts.active:,} active, "
        f"{counts.engram_tables:,} in Engram tables, {counts.embedding:,} embedding and head); "
        f"{jax.device_count()} device(s), {jax.process_count()} process(es)")
    vocab = len(data.tokenizer)
    unigram = unigram_cross_entropy(
        sum(part.train.token_counts(vocab) for part in data.parts),
        sum(part.validation.token_counts(vocab) for part in data.parts))
    say(f"unigram baseline: validation loss {unigram:.3f} nats/token")

    checkpointer = run.checkpointer(keep=cfg.keep_checkpoints)
    restored = (checkpointer.restore(model, optimizer, iterator, set_aside=True,
                                     host_tables=tables) if resume else None)
    if resume and restored is None:
        checkpointer.close()
        raise ResumeError(f"no checkpoint in {checkpointer.directory} could be restored (see the "
                          "warnings); move them away or choose a new train.run_dir")
    start = restored[0] if restored else 0
    if restored:
        say(f"resumed from {checkpointer.directory / str(start)} (step {start})")
    meta = {"tokenizer": data.tokenizer, "data": fingerprint}
    writer = MetricsWriter(run, is_main)
    if start == 0:
        writer.write(0, {**data.report.metrics(), "unigram_loss": unigram})
    usage = RowUsage(hasher.layout if hasher is not None else None)
    logger = TrainLogger(writer, cfg.batch_size * config.data.seq_len,
                         learning_rate_schedule(cfg), counts.flops_per_token,
                         device_peak_flops(cfg.peak_flops), usage, start)
    byte_lengths = np.asarray(data.tokenizer.token_byte_lengths())
    signals = StopSignals()
    bar = tqdm(total=cfg.steps, initial=start, desc="training", unit="step",
               disable=not (progress and is_main), dynamic_ncols=True)
    final, step = {}, start
    try:
        for step in range(start + 1, cfg.steps + 1):
            batch = next(iterator)
            usage.add(batch["hash_ids"])
            metrics = jitted_train_step(model, optimizer, to_device(batch, mesh), cfg.grad_accum)
            if tables is not None:  # the next batch's rows are read while the device computes
                table_step = metrics.pop("host_table_step")
                iterator.read_ahead()
                iterator.patch(tables.apply(table_step))
            logger.add(step, metrics)
            bar.update(1)
            last = step == cfg.steps
            if step % cfg.log_every == 0 or last:
                row = logger.flush(step)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if step % cfg.eval_every == 0 or last:
                logger.flush(step)
                result = evaluate_sources(model, [
                    (part.name, part.weight, validation_batches[part.name],
                     eval_counts[part.name]) for part in data.parts], mesh, byte_lengths, tables)
                writer.write(step, result)
                final = {**logger.last, **result}
                bar.write(f"step {step}: validation loss {result['val_loss']:.4f} "
                          f"(perplexity {result['val_perplexity']:.1f}, "
                          f"{result['val_bits_per_byte']:.3f} bits/byte)")
            stop = signals.stop_after(step)
            if step % cfg.checkpoint_every == 0 or last or stop:
                logger.flush(step)
                checkpointer.save(step, model, optimizer, iterator,
                                  checkpoint_meta(config, **meta, step=step), tables)
            if stop:
                checkpointer.wait()
                signals.inject(step)
            if signals.terminate:
                say(f"\nSIGTERM: saved a checkpoint at step {step} in {checkpointer.directory}; "
                    "run the same command to resume")
                break
    finally:
        bar.close()
        signals.restore()
        checkpointer.close()
        writer.close()
    final["unigram_loss"] = unigram
    if is_main and step == cfg.steps and "val_loss" in final:
        run.write_result({**final, "step": step, "wall_s": time.perf_counter() - clock})
        say(f"final validation loss {final['val_loss']:.4f} (unigram baseline {unigram:.3f}); "
            f"checkpoints in {checkpointer.directory}, metrics in {writer.path}, "
            f"plot {plot_run(run)}")
    return final
