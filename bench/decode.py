"""Decoding speed, with and without Engram, and with Engram tables on the device or the host.

For the config's model (random weights: speed does not depend on them) and the same model with
`engram` removed, at each batch size: prefill tokens/s (the prompts through `extend` in one
call) and decode tokens/s of
  compiled         the whole decode in one `lax.while_loop`, hashing on the device
  stepwise         one compiled step per token, hashing on the host, tables on the device
  stepwise_host    the same with the Engram tables in host memory (rows gathered on the host
                   while the blocks before the first Engram layer run)
Decode tokens/s is B x (N - 1) / (time for N new tokens - time for 1), so prefill and compile
are left out. Each repeat runs every model and loop once, in turn, so a ratio is taken within a
repeat (the same machine load); figures are medians over --repeats. One JSON line per (model,
batch, loop), then one per batch with the ratios: Engram's decode overhead (compiled, against
the model without Engram), host tables against device tables (stepwise), and hashing on the
device against the host (compiled against stepwise); and the host's own work per step with host
tables (hash the new tokens, gather their rows, transfer them), timed alone over 200 steps, as a
fraction of the stepwise step: what the mechanism costs at most if nothing overlapped it.

Usage: python bench/decode.py [--config configs/small.yaml] [--batches 1 16] [--prompt-len 64]
       [--new-tokens 128] [--repeats 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np
from flax import nnx

from engram_jax.config import load_model_config
from engram_jax.data.compression import CompressedTokenizer
from engram_jax.data.hashing import NgramHasher
from engram_jax.inference.decode import Decoder, _HostHistory, _prefill_step, prompt_bucket
from engram_jax.nn.model import Transformer

LOOPS = {"compiled": ("device", "compiled"), "stepwise": ("device", "stepwise"),
         "stepwise_host": ("host", "stepwise")}


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    config = load_model_config(args.config)
    if config.engram is None:
        raise SystemExit(f"{args.config} has no Engram layers to compare against")
    models = {"engram": Transformer(config, rngs=nnx.Rngs(0)),
              "no_engram": Transformer(dataclasses.replace(config, engram=None),
                                       rngs=nnx.Rngs(0))}
    hasher = NgramHasher(config.engram, CompressedTokenizer.identity(config.vocab_size))
    rng = np.random.default_rng(0)
    for batch in args.batches:
        prompts = rng.integers(0, config.vocab_size, (batch, args.prompt_len)).tolist()
        runs = [(name, loop) for name in models for loop in LOOPS
                if name == "engram" or loop != "stepwise_host"]

        decoders = {(name, loop): Decoder(models[name], hasher if name == "engram" else None,
                                          engram_tables=LOOPS[loop][0]) for name, loop in runs}

        def decode(name, loop, new):
            return decoders[name, loop].decode(prompts, max_new=new, loop=LOOPS[loop][1])

        def prefill(name):
            model = models[name]
            padded = prompt_bucket(args.prompt_len, None)
            ids = hasher(np.asarray(prompts)) if name == "engram" else {}
            graphdef, state = nnx.split(model)
            jax.block_until_ready(_prefill_step(
                graphdef, state, np.asarray(prompts, np.int32), ids,
                np.full(batch, args.prompt_len, np.int32), None, cache_len=padded))

        for name, loop in runs:  # compile every program first
            decode(name, loop, 1), decode(name, loop, args.new_tokens), prefill(name)
        rates = {run: [] for run in runs}
        fills = {name: [] for name in models}
        for _ in range(args.repeats):  # every loop once per repeat: ratios within a repeat
            for name, loop in runs:
                one = _seconds(lambda: decode(name, loop, 1))
                many = _seconds(lambda: decode(name, loop, args.new_tokens))
                rates[name, loop].append(batch * (args.new_tokens - 1) / max(many - one, 1e-9))
            for name in models:
                fills[name].append(batch * args.prompt_len / _seconds(lambda: prefill(name)))
        for (name, loop), values in rates.items():
            print(json.dumps({
                "model": name, "loop": loop, "batch": batch, "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "decode_tokens_per_s": round(float(np.median(values)), 1),
                "prefill_tokens_per_s": round(float(np.median(fills[name])), 1),
                "repeats": args.repeats, "backend": jax.default_backend()}), flush=True)
        tables = decoders["engram", "stepwise_host"].tables
        history = _HostHistory(hasher, np.zeros((batch, config.engram.max_ngram_size - 1),
                                                np.int32))
        new = np.asarray(prompts)[:, 0]
        host_step = lambda: jax.block_until_ready(jax.device_put(tables.gather(
            history.hash_ids(new))))
        host_step()
        host_s = _seconds(lambda: [host_step() for _ in range(200)]) / 200
        step_s = batch / float(np.median(rates["engram", "stepwise_host"]))
        ratio = lambda a, b: round(float(np.median(np.asarray(rates[a]) / np.asarray(rates[b]))),
                                   4)
        print(json.dumps({
            "batch": batch,
            "engram_decode_overhead": round(
                ratio(("no_engram", "compiled"), ("engram", "compiled")) - 1, 4),
            "host_tables_throughput_loss": round(
                1 - ratio(("engram", "stepwise_host"), ("engram", "stepwise")), 4),
            "device_hashing_speedup": ratio(("engram", "compiled"), ("engram", "stepwise")),
            "host_table_work_us_per_step": round(host_s * 1e6, 1),
            "host_table_work_over_step": round(host_s / step_s, 4)}), flush=True)


if __name__ == "__main__":
    main()
