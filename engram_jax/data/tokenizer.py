"""Text tokenizers: Hugging Face tokenizers loaded from disk or a hub, and the offline default.

Only the `tokenizers` library is needed (no `transformers`). A `TextTokenizer` exposes exactly what
the Engram compression needs from a tokenizer (`len`, single-id decode, id-to-token) plus batch
encoding for the input pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# The spacing clean-up `transformers` applies in `decode` when a tokenizer's config sets
# `clean_up_tokenization_spaces` (same replacements, same order).
_CLEAN_UP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
    (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    """Applies the `transformers` decode clean-up (removes spaces before punctuation)."""
    for old, new in _CLEAN_UP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


def _token_text(value) -> str | None:
    """A special token of `tokenizer_config.json`: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus what a `transformers` tokenizer config would add.

    Args:
      tokenizer: the underlying fast tokenizer.
      clean_up_tokenization_spaces: whether `decode` removes spaces before punctuation, as
        `transformers` does when the tokenizer's `tokenizer_config.json` asks for it.
      name: where it came from (a path or hub name), for messages.
      eos_token, bos_token: the end- and beginning-of-sequence tokens the config names, if any.
    """

    def __init__(self, tokenizer: Tokenizer, clean_up_tokenization_spaces: bool = False,
                 name: str = "<in memory>", eos_token: str | None = None,
                 bos_token: str | None = None):
        self.tokenizer = tokenizer
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.name = name
        self.eos_token, self.bos_token = eos_token, bos_token

    def options(self) -> dict:
        """What `tokenizer_config.json` holds for this tokenizer."""
        return {"clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
                "eos_token": self.eos_token, "bos_token": self.bos_token}

    def fingerprint(self) -> str:
        """sha256 of the tokenizer's JSON and options: equal exactly when it tokenises alike."""
        text = self.tokenizer.to_str() + json.dumps(self.options(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def __len__(self) -> int:
        """Vocabulary size, added tokens included (what `len(transformers_tokenizer)` gives)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name!r}, vocab={len(self)})"

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes ids to text, special tokens kept."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def decode_each(self, ids: Sequence[int]) -> list[str]:
        """Decodes every id on its own: `[decode([i]) for i in ids]`, batched."""
        texts = self.tokenizer.decode_batch([[int(i)] for i in ids], skip_special_tokens=False)
        if self.clean_up_tokenization_spaces:
            texts = [clean_up_tokenization(t) for t in texts]
        return texts

    def token_byte_lengths(self) -> np.ndarray:
        """int32 (vocab,): the UTF-8 bytes each id stands for in decoded text, 0 for special
        tokens (exact for byte-level BPE, whose token strings hold one character per byte; the
        length of each id decoded alone otherwise). Summed over a sample's targets it gives the
        sample's text bytes, for bits per byte."""
        added = self.tokenizer.get_added_tokens_decoder()
        byte_level = isinstance(self.tokenizer.decoder, decoders.ByteLevel)
        texts = None if byte_level else self.decode_each(range(len(self)))
        lengths = np.zeros(len(self), np.int32)
        for i in range(len(self)):
            if i in added:
                lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            elif byte_level:
                lengths[i] = len(self.tokenizer.id_to_token(i))
            else:
                lengths[i] = len(texts[i].encode("utf-8", "surrogatepass"))
        return lengths

    def id_to_token(self, token_id: int) -> str:
        """The raw vocabulary string of one id (`convert_ids_to_tokens`)."""
        token = self.tokenizer.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"token id {token_id} is not in tokenizer {self.name!r} "
                             f"(vocabulary size {len(self)})")
        return token

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, with no special tokens added."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def token_id(self, token: str) -> int:
        """The id of a vocabulary string; raises ValueError naming it when absent."""
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in tokenizer {self.name!r}")
        return token_id

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        """Writes `tokenizer.json` and `tokenizer_config.json` into `directory`."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / TOKENIZER_FILE))
        options = {k: v for k, v in self.options().items() if v is not None}
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(options, indent=1) + "\n")
        return directory


def load_tokenizer(name_or_path: str | os.PathLike) -> TextTokenizer:
    """Loads a Hugging Face tokenizer.

    Args:
      name_or_path: a `tokenizer.json` file, a directory holding one (its `tokenizer_config.json`,
        if any, supplies `clean_up_tokenization_spaces`, ignored for BPE models as `transformers`
        5 does), or a hub name such as
        "deepseek-ai/DeepSeek-V3", which needs network access and is never used by default.
    """
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return TextTokenizer(Tokenizer.from_file(str(path)), name=str(path))
    if path.is_dir():
        file = path / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer directory {path} has no {TOKENIZER_FILE}")
        config = {}
        config_file = path / TOKENIZER_CONFIG_FILE
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{config_file} is not valid JSON: {err}") from err
        tokenizer = Tokenizer.from_file(str(file))
        # `transformers` (5.x) ignores the clean-up flag for BPE models: it would corrupt them.
        clean_up = (bool(config.get("clean_up_tokenization_spaces", False))
                    and not isinstance(tokenizer.model, models.BPE))
        return TextTokenizer(tokenizer, clean_up, name=str(path),
                             eos_token=_token_text(config.get("eos_token")),
                             bos_token=_token_text(config.get("bos_token")))
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".json"):
        raise FileNotFoundError(f"tokenizer path {name} does not exist")
    try:
        return TextTokenizer(Tokenizer.from_pretrained(name), name=name)
    except Exception as err:  # the hub client raises many kinds of errors when offline
        raise OSError(f"could not load tokenizer {name!r}: it is not a local file or directory, "
                      f"and loading it from the hub failed ({err})") from err


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int,
                        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> TextTokenizer:
    """Trains a byte-level BPE tokenizer (GPT-2 style: every byte string is encodable).

    Args:
      texts: training text.
      vocab_size: target vocabulary size, special tokens and the 256 byte symbols included.
      special_tokens: added first, so they get ids 0, 1, ...
    """
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE "
                         f"(needs at least {256 + len(special_tokens)})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tokenizer, name=f"byte-level BPE ({vocab_size})",
                         eos_token=special_tokens[0] if special_tokens else None)


def default_cache_dir() -> pathlib.Path:
    """`$ENGRAM_JAX_CACHE`, else `$XDG_CACHE_HOME/engram_jax`, else `~/.cache/engram_jax`."""
    if "ENGRAM_JAX_CACHE" in os.environ:
        return pathlib.Path(os.environ["ENGRAM_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "engram_jax"


def cached_bpe_tokenizer(texts: Sequence[str], vocab_size: int,
                         cache_dir: str | os.PathLike | None = None,
                         special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> TextTokenizer:
    """The offline default tokenizer: a byte-level BPE trained on `texts`, trained once.

    The result is stored under `cache_dir/tokenizers/<key>`, where the key hashes the corpus, the
    vocabulary size and the special tokens, so a second call with the same inputs loads it.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([vocab_size, list(special_tokens)]).encode())
    for text in texts:
        encoded = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    directory = pathlib.Path(cache_dir or default_cache_dir()) / "tokenizers" / (
        f"bpe{vocab_size}-{digest.hexdigest()[:16]}")
    if (directory / TOKENIZER_FILE).is_file():
        return load_tokenizer(directory)
    tokenizer = train_bpe_tokenizer(texts, vocab_size, special_tokens)
    # Write to a temporary directory, then rename: a crash never leaves a half-written cache entry.
    staging = directory.with_name(directory.name + f".tmp{os.getpid()}")
    tokenizer.save(staging)
    try:
        staging.rename(directory)
    except OSError:  # another process finished first; theirs is identical
        for f in staging.iterdir():
            f.unlink()
        staging.rmdir()
    return load_tokenizer(directory)
