"""The training loop: `train(config)` runs (or resumes) a run in `config.train.run_dir`.

Set-up (data, model and optimiser, the newest readable checkpoint), then one loop: the jitted
`train_step` on each batch, then the hooks: metrics every `train.log_every` steps, validation
every `train.eval_every`, a checkpoint every `train.checkpoint_every` and on SIGTERM. What the
run directory holds is `engram_jax.train.run_dir`.
"""

from __future__ import annotations

import time

import jax
from flax import nnx
from tqdm import tqdm

from engram_jax.accounting import count_parameters
from engram_jax.config.schema import Config
from engram_jax.data.pipeline import make_hasher, training_batches, unigram_cross_entropy
from engram_jax.data.prepare import prepare_data
from engram_jax.sharding.mesh import default_mesh, use_mesh
from engram_jax.train.evaluation import evaluate, to_device
from engram_jax.train.metrics import (MetricsWriter, RowUsage, TrainLogger, device_peak_flops,
                                      plot_run)
from engram_jax.train.optimizer import learning_rate_schedule
from engram_jax.train.run_dir import RunDir, checkpoint_meta
from engram_jax.train.signals import StopSignals
from engram_jax.train.step import create_train_state, train_step


def train(config: Config, progress: bool = True) -> dict:
    """Runs (or resumes) training; returns the final metrics (see the module docstring)."""
    clock, cfg = time.perf_counter(), config.train
    run, is_main = RunDir(cfg.run_dir), jax.process_index() == 0
    say = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)
    run.create()
    data = prepare_data(config.data, progress=progress and is_main)
    say(f"data: {data.report.summary()}; {len(data.train_tokens):,} training and "
        f"{len(data.validation_tokens):,} validation tokens")
    if len(data.tokenizer) > config.model.vocab_size:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                         f"tokenizer's {len(data.tokenizer)} ids")
    hasher = make_hasher(config.model.engram, data.tokenizer, data.eod_id)
    if is_main:
        run.write_config(config)
        run.write_tokenizer(data.tokenizer)
    mesh = default_mesh(config.sharding)
    train_batches, validation_batches = training_batches(config, data, hasher)
    iterator = iter(train_batches)
    with use_mesh(config.sharding, mesh):
        model, optimizer = create_train_state(config)
    counts = count_parameters(config.model, seq_len=config.data.seq_len)
    say(f"model: {counts.total:,} parameters ({counts.active:,} active, "
        f"{counts.engram_tables:,} in Engram tables, {counts.embedding:,} embedding and head); "
        f"{jax.device_count()} device(s), {jax.process_count()} process(es)")
    unigram = unigram_cross_entropy(data.train_tokens, data.validation_tokens, len(data.tokenizer))
    say(f"unigram baseline: validation loss {unigram:.3f} nats/token")

    checkpointer = run.checkpointer(keep=cfg.keep_checkpoints)
    restored = checkpointer.restore(model, optimizer, iterator)
    start = restored[0] if restored else 0
    if restored:
        say(f"resumed from {checkpointer.directory / str(start)} (step {start})")
    step_fn = nnx.jit(train_step, static_argnums=(3,), donate_argnums=(0, 1))
    writer = MetricsWriter(run, is_main)
    usage = RowUsage(hasher.layout if hasher is not None else None)
    logger = TrainLogger(writer, cfg.batch_size * config.data.seq_len,
                         learning_rate_schedule(cfg), counts.flops_per_token,
                         device_peak_flops(cfg.peak_flops), usage, start)
    signals = StopSignals()
    bar = tqdm(total=cfg.steps, initial=start, desc="training", unit="step",
               disable=not (progress and is_main), dynamic_ncols=True)
    final, step = {}, start
    try:
        for step in range(start + 1, cfg.steps + 1):
            batch = next(iterator)
            usage.add(batch["hash_ids"])
            logger.add(step, step_fn(model, optimizer, to_device(batch, mesh), cfg.grad_accum))
            bar.update(1)
            last = step == cfg.steps
            if step % cfg.log_every == 0 or last:
                row = logger.flush(step)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if step % cfg.eval_every == 0 or last:
                logger.flush(step)
                result = evaluate(model, validation_batches, mesh, cfg.eval_batches,
                                  data.validation_bytes_per_token)
                writer.write(step, result)
                final = {**logger.last, **result}
                bar.write(f"step {step}: validation loss {result['val_loss']:.4f} "
                          f"(perplexity {result['val_perplexity']:.1f}, "
                          f"{result['val_bits_per_byte']:.3f} bits/byte)")
            stop = signals.stop_after(step)
            if step % cfg.checkpoint_every == 0 or last or stop:
                logger.flush(step)
                checkpointer.save(step, model, optimizer, iterator,
                                  checkpoint_meta(config, data.tokenizer, step))
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
