"""Generate text from a checkpoint: `python -m engram_jax.generate --checkpoint DIR --prompt TEXT`.
DIR is a run directory or its `checkpoints/` directory (the newest readable checkpoint is used);
the model, its config and its tokenizer come from the checkpoint. Text is streamed to stdout as
it is produced (with several prompts, each result follows its prompt's number). Greedy unless
--temperature is above 0. The model's maximum length (prompt and new tokens) is the training
`data.seq_len` unless --max-length says otherwise. Examples:
  python -m engram_jax.generate --checkpoint runs/small --prompt "Once upon a time"
  python -m engram_jax.generate --checkpoint runs/small --prompt-file prompts.txt \\
      --temperature 0.8 --top-p 0.9 --seed 1 --engram-tables host
Exit codes: 0 done, 2 bad input (checkpoint, prompt, settings).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from engram_jax.config import ConfigError
from engram_jax.inference.decode import TABLE_PLACES, GenerationError, generate
from engram_jax.inference.sampling import Sampling
from engram_jax.train.run_dir import load_trained


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = pathlib.Path(args.prompt_file)
        if not path.is_file():
            raise GenerationError(f"--prompt-file {path} does not exist")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise GenerationError("give a prompt: --prompt TEXT or --prompt-file FILE (one prompt "
                              "per line)")
    return prompts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--checkpoint", required=True, help="run or checkpoints directory")
    parser.add_argument("--prompt", action="append", help="a prompt (may be repeated)")
    parser.add_argument("--prompt-file", help="a file of prompts, one per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus cut")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-token", action="append", default=None,
                        help="a token that ends a row (default: the end-of-document token)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="the model's maximum length (default: the training data.seq_len)")
    parser.add_argument("--engram-tables", choices=TABLE_PLACES, default="device",
                        help="where the Engram tables live while decoding")
    args = parser.parse_args(argv)
    try:
        prompts = _prompts(args)
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
    except (GenerationError, ValueError) as err:
        print(f"generate: {err}", file=sys.stderr)
        return 2
    try:
        trained = load_trained(args.checkpoint)
    except (ConfigError, FileNotFoundError, RuntimeError) as err:
        print(f"generate: {err}", file=sys.stderr)
        return 2
    tokenizer, data = trained.tokenizer, trained.config.data
    try:
        stop = None if args.stop_token is None else [tokenizer.token_id(t)
                                                     for t in args.stop_token]
    except (KeyError, ValueError) as err:
        print(f"generate: --stop-token: {err}", file=sys.stderr)
        return 2
    single = len(prompts) == 1
    echoed = []  # the prompt is written before its first new text

    def show(row: int, text: str) -> None:
        if single:
            if not echoed:
                echoed.append(sys.stdout.write(prompts[0]))
            sys.stdout.write(text)
            sys.stdout.flush()

    try:
        results = generate(trained.model, tokenizer, prompts,
                           max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                           stop_tokens=stop, max_length=args.max_length or data.seq_len,
                           eod_token=data.eod_token, document_mask=data.document_mask,
                           engram_tables=args.engram_tables, on_text=show)
    except GenerationError as err:
        print(f"generate: {err}", file=sys.stderr)
        return 2
    if single:
        sys.stdout.write(("" if echoed else prompts[0]) + "\n")
    else:
        for row, (prompt, result) in enumerate(zip(prompts, results)):
            print(f"[{row}] {prompt}{result.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
