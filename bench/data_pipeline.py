"""The data pipeline at corpus scale: streaming pre-tokenisation and the training reader.

Generates JSONL corpora of synthetic documents (words of a made-up Zipfian vocabulary, a
thousand words or so each) at two sizes, then prints one JSON line per measurement:

  stage "pretokenize"  `python -m engram_jax.pretokenize` on a corpus with `workers` processes
                       (a fresh process each): `corpus_tokens`, `text_mb`, `tokens_per_s` and
                       `mb_per_s` (text read per second), `peak_rss_mb` (the main process's
                       peak plus `workers` times the largest worker's: an upper bound of the
                       whole), `main_rss_mb`, `worker_rss_mb`, `seconds`;
  stage "reader"       the training input pipeline over a pre-tokenised corpus (random access
                       by ArrayRecordReader range reads, shuffled, hash ids of the
                       config's Engram computed in `workers` threads), in a fresh process:
                       `tokens_per_s` (tokens of the batches delivered per second, hashing
                       included), `peak_rss_mb` (the process's peak), `corpus_tokens`.

The tokenizer is the default byte-level BPE of the config's `tokenizer_vocab_size`, trained
once on the first --tokenizer-sample-mb MiB of the smallest corpus and given to every run as
`data.tokenizer`, so no run's time includes training it.

Usage: python bench/data_pipeline.py [--out DIR] [--tokens 1e8 1e9] [--workers 1 2]
       [--config configs/small.yaml] [--reader-batches 300] [--tokenizer-sample-mb 16]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
BYTES_PER_TOKEN_GUESS = 3.6  # of the generated text with a 4096-id BPE, to size the corpora
DOCUMENT_WORDS = 1000
FILE_MB = 256


def generate(directory: pathlib.Path, target_bytes: int, seed: int = 0) -> int:
    """JSONL files of synthetic documents in `directory`, about `target_bytes` of text in all
    (kept when they are already there); returns the text bytes."""
    done = directory / "done.json"
    if done.is_file():
        return json.loads(done.read_text())["bytes"]
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    lengths = rng.integers(2, 10, 20000)
    words = np.array(["".join(rng.choice(letters, n)) for n in lengths])
    ranks = 1.0 / np.arange(1, len(words) + 1)
    probabilities = ranks / ranks.sum()
    written, index = 0, 0
    while written < target_bytes:
        with open(directory / f"part-{index:04d}.jsonl", "w") as f:
            size = 0
            while size < FILE_MB * 2**20 and written + size < target_bytes:
                picks = rng.choice(len(words), size=(64, DOCUMENT_WORDS), p=probabilities)
                for row in picks:
                    line = json.dumps({"text": " ".join(words[row])}) + "\n"
                    f.write(line)
                    size += len(line)
        written += size
        index += 1
    done.write_text(json.dumps({"bytes": written}))
    return written


def train_tokenizer(corpus: pathlib.Path, out: pathlib.Path, config: str,
                    sample_mb: float) -> pathlib.Path:
    """The default BPE trained on the first `sample_mb` MiB of `corpus`, saved in `out`."""
    from engram_jax.config import load_config
    from engram_jax.data.tokenizer import train_bpe_tokenizer

    if (out / "tokenizer.json").is_file():
        return out
    texts, size = [], 0
    with open(sorted(corpus.glob("*.jsonl"))[0]) as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size >= sample_mb * 2**20:
                break
    vocab = load_config(config).data.tokenizer_vocab_size
    train_bpe_tokenizer(texts, vocab).save(out)
    return out


def _peak_mb(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def pretokenize_stage(corpus: pathlib.Path, out: pathlib.Path, workers: int, config: str,
                      tokenizer: pathlib.Path) -> dict:
    """Runs in a fresh process (`--child pretokenize`) on an empty `out`."""
    from engram_jax.config import load_config
    from engram_jax.pretokenize import pretokenize

    if out.exists():
        shutil.rmtree(out)
    data = load_config(config, ["data.source=jsonl", f"data.paths=['{corpus}/*.jsonl']",
                                f"data.tokenizer={tokenizer}"]).data
    start = time.perf_counter()
    meta = pretokenize(data, out, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["validation"]["tokens"]
    text_mb = meta["report"]["text_bytes"] / 2**20
    main, worker = _peak_mb(resource.RUSAGE_SELF), _peak_mb(resource.RUSAGE_CHILDREN)
    return {"bench": "data_pipeline", "stage": "pretokenize", "corpus_tokens": tokens,
            "text_mb": round(text_mb, 1), "workers": workers, "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds), "mb_per_s": round(text_mb / seconds, 2),
            "peak_rss_mb": round(main + workers * worker, 1), "main_rss_mb": round(main, 1),
            "worker_rss_mb": round(worker, 1) if workers else 0.0}


def reader_stage(tokens_dir: pathlib.Path, config: str, batches: int, workers: int) -> dict:
    """Runs in a fresh process (`--child reader`)."""
    from engram_jax.config import load_config
    from engram_jax.data.pipeline import make_hasher, training_batches
    from engram_jax.data.prepare import prepare_data

    full = load_config(config, ["data.source=array_record", f"data.paths=['{tokens_dir}']",
                                f"data.num_threads={workers}"])
    prepared = prepare_data(full.data, progress=False)
    hasher = make_hasher(full, prepared.tokenizer, prepared.eod_id)
    train, _ = training_batches(full, prepared, hasher)
    iterator = iter(train)
    next(iterator)  # threads started, first batch read
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    seconds = time.perf_counter() - start
    delivered = batches * batch["tokens"][:, :-1].size
    return {"bench": "data_pipeline", "stage": "reader",
            "corpus_tokens": prepared.train.fingerprint()["tokens"],
            "batch_size": full.train.batch_size, "seq_len": full.data.seq_len,
            "workers": workers, "batches": batches, "hash_ids": hasher is not None,
            "tokens_per_s": round(delivered / seconds),
            "peak_rss_mb": round(_peak_mb(resource.RUSAGE_SELF), 1)}


def _child(args: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                            text=True, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_data", help="corpora and shards go here")
    parser.add_argument("--tokens", type=float, nargs="+", default=[1e8, 1e9],
                        help="corpus sizes to generate, in tokens (approximate)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="pre-tokenising processes, each on the smallest corpus; the "
                             "largest count also on every other corpus")
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--reader-batches", type=int, default=300)
    parser.add_argument("--reader-threads", type=int, default=2)
    parser.add_argument("--tokenizer-sample-mb", type=float, default=16.0)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "pretokenize":
            corpus, out, workers, config, tokenizer = rest
            row = pretokenize_stage(pathlib.Path(corpus), pathlib.Path(out), int(workers),
                                    config, pathlib.Path(tokenizer))
        else:
            tokens_dir, config, batches, workers = rest
            row = reader_stage(pathlib.Path(tokens_dir), config, int(batches), int(workers))
        print(json.dumps(row))
        return
    out = pathlib.Path(args.out).resolve()
    sizes = sorted(int(t) for t in args.tokens)
    corpora = {}
    for size in sizes:
        directory = out / f"text-{size:.0e}"
        text_bytes = generate(directory, int(size * BYTES_PER_TOKEN_GUESS))
        print(json.dumps({"bench": "data_pipeline", "stage": "generate", "corpus": str(directory),
                          "text_mb": round(text_bytes / 2**20, 1)}), flush=True)
        corpora[size] = directory
    tokenizer = train_tokenizer(corpora[sizes[0]], out / "tokenizer", args.config,
                                args.tokenizer_sample_mb)
    runs = [(sizes[0], w) for w in args.workers] + [(s, max(args.workers)) for s in sizes[1:]]
    finished = {}
    for size, workers in runs:
        tokens_dir = out / f"tokens-{size:.0e}-w{workers}"
        print(json.dumps(_child(["pretokenize", str(corpora[size]), str(tokens_dir),
                                 str(workers), args.config, str(tokenizer)])), flush=True)
        finished[size] = tokens_dir
    for size in sizes:
        print(json.dumps(_child(["reader", str(finished[size]), args.config,
                                 str(args.reader_batches), str(args.reader_threads)])),
              flush=True)


if __name__ == "__main__":
    main()
