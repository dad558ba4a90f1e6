"""Tokenise a corpus once into ArrayRecord shards:
`python -m engram_jax.pretokenize --config CONFIG --out DIR [data.key=value ...]`.

DIR then holds `train-*.array_record` and `validation-*.array_record`, `tokenizer/` and
`meta.json` (the format: `engram_jax.data.shards`). Train from it with
`data.source=array_record 'data.paths=["DIR"]'`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from engram_jax.config import ConfigError, load_config
from engram_jax.data import shards
from engram_jax.data.prepare import prepare_data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/small.yaml", help="YAML file or preset")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("overrides", nargs="*", help="data.key=value settings")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides).data
    except (ConfigError, FileNotFoundError) as err:
        print(f"pretokenize: {err}", file=sys.stderr)
        return 2
    if config.source == "array_record":
        print("pretokenize: the source is already pre-tokenised", file=sys.stderr)
        return 2
    prepared = prepare_data(config)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shards.write_shards(prepared.train_tokens, out, "train", args.shards)
    shards.write_shards(prepared.validation_tokens, out, "validation", 1)
    prepared.tokenizer.save(out / shards.TOKENIZER_DIR)
    shards.write_meta(out, {
        "eod_id": prepared.eod_id,
        "train_tokens": int(len(prepared.train_tokens)),
        "validation_tokens": int(len(prepared.validation_tokens)),
        "report": vars(prepared.report)})
    print(f"wrote {len(prepared.train_tokens):,} training and {len(prepared.validation_tokens):,}"
          f" validation tokens to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
