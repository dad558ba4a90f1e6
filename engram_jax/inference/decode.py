"""Generation: prefill a batch of prompts, then one token per step with a KV cache.

`generate(model, tokenizer, prompts, ...)` pads the prompts on the right to a length bucket (a
power of two, so the step compiles once per bucket), runs them through `Transformer.extend`
in one call (the prefill), then decodes. Two loops:

  tables on the device  the whole decode is one compiled `lax.while_loop`: sampling, the new
                        token's n-gram ids (`DeviceHasher`, exact 64-bit hashing in 32-bit
                        lanes), one `extend` step. Text is streamed by an ordered host callback.
  tables on the host    one compiled step per token, split at the first Engram block: the host
                        reads the token, dispatches the blocks before the first Engram layer,
                        and while they run hashes the token (`NgramHasher`), gathers its rows
                        (`HostTables`) and sends them; the second part takes the rows and
                        samples the next token. The device holds no table.

Both give the same tokens (tested). Engram's state per sequence is the last N - 1 compressed
tokens (for the next token's hash ids) and each Engram block's convolution inputs
(`Transformer.init_cache`). README, "Generation", has the measurements behind the choice of
hashing on the device.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from engram_jax.data.hashing import NgramHasher
from engram_jax.data.pipeline import engram_hasher
from engram_jax.data.prepare import end_of_document_id
from engram_jax.data.tokenizer import TextTokenizer
from engram_jax.inference.hashing import DeviceHasher, next_history, prompt_history
from engram_jax.inference.host_tables import HostTables, state_without_tables
from engram_jax.inference.sampling import Sampling, sample_tokens
from engram_jax.nn.model import Transformer

MIN_BUCKET = 16
TABLE_PLACES = ("device", "host")


class GenerationError(ValueError):
    """A request generation cannot serve (empty prompt, too long, bad settings)."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """One prompt's result: the new tokens (without the stop token), their text, and why it
    ended ("stop": a stop token; "length": max new tokens or the model's maximum length)."""

    tokens: list[int]
    text: str
    finish_reason: str


def prompt_bucket(length: int, limit: int | None) -> int:
    """The padded prompt length: the next power of two >= length (at least 16), at most
    `limit`."""
    bucket = max(MIN_BUCKET, 1 << max(0, length - 1).bit_length())
    return bucket if limit is None else max(length, min(bucket, limit))


# The sink of the compiled loop's ordered host callback; set by `generate` while it runs.
_stream_sink: list[Callable[[np.ndarray, np.ndarray], None]] = []


def _stream(tokens, alive) -> None:
    if _stream_sink:
        _stream_sink[-1](np.asarray(tokens), np.asarray(alive))


def _stopped(tokens: jax.Array, stop_tokens: tuple[int, ...]) -> jax.Array:
    return jnp.isin(tokens, jnp.asarray(stop_tokens or (-1,), jnp.int32))


def _prefill(model: Transformer, prompt, prompt_ids, lengths, cache_len, rows=None):
    cache = model.init_cache(prompt.shape[0], cache_len)
    logits, cache = model.extend(prompt, prompt_ids, cache, lengths, rows)
    return logits[jnp.arange(prompt.shape[0]), lengths - 1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "max_new", "cache_len",
                                             "stop_tokens", "vocab_limit", "stream"))
def decode_on_device(graphdef, state, hasher: DeviceHasher | None, prompt, prompt_ids, lengths,
                     history, key, *, sampling: Sampling, max_new: int, cache_len: int,
                     stop_tokens: tuple[int, ...], vocab_limit: int, stream: bool):
    """Prefill and the whole decode in one program (tables on the device).

    Args:
      graphdef, state: the model (`nnx.split`).
      hasher: the device hasher, or None without Engram.
      prompt: int32 (B, P) prompts padded on the right; prompt_ids: their hash ids
        {layer: (B, P, K)}; lengths: int32 (B,) prompt lengths; history: int32 (B, N - 1)
        compressed tokens at each prompt's end (`prompt_history`; ignored without Engram).
      key: PRNG key; step t samples with fold_in(key, t).

    Returns:
      int32 (B, max_new) tokens (stop tokens included, then -1), int32 (B,) tokens before the
      stop token or the end, bool (B,) whether a stop token ended the row.
    """
    batch = prompt.shape[0]
    last, cache = _prefill(nnx.merge(graphdef, state), prompt, prompt_ids, lengths, cache_len)
    # The parameters ride in the carry (unchanged, so not copied): the model is rebuilt in the
    # loop's own trace, where its modules may write their metrics variables.
    carry = (jnp.int32(0), last, cache, history, jnp.full((batch, max_new), -1, jnp.int32),
             jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32), state)

    def body(carry):
        step, last, cache, history, out, done, count, state = carry
        tokens = sample_tokens(last, jax.random.fold_in(key, step), sampling, vocab_limit)
        out = out.at[:, step].set(jnp.where(done, -1, tokens))
        stop = _stopped(tokens, stop_tokens) & ~done
        count = count + (~done & ~stop).astype(jnp.int32)
        if stream:
            io_callback(_stream, None, tokens, ~done & ~stop, ordered=True)
        ids = {}
        if hasher is not None:
            ids = {layer: a[:, None] for layer, a in hasher.hash_ids(history, tokens).items()}
            history = hasher.next_history(history, tokens)
        model = nnx.merge(graphdef, state)
        logits, cache = model.extend(tokens[:, None], ids, cache, jnp.ones((batch,), jnp.int32))
        return step + 1, logits[:, 0], cache, history, out, done | stop, count, state

    def unfinished(carry):
        return (carry[0] < max_new) & ~jnp.all(carry[5])

    _, _, _, _, out, done, count, _ = jax.lax.while_loop(unfinished, body, carry)
    return out, count, done


# The stepwise loop (tables on the host): the prefill, then per token `StepPrograms`.
@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill_step(graphdef, state, prompt, prompt_ids, lengths, rows, *, cache_len: int):
    return _prefill(nnx.merge(graphdef, state), prompt, prompt_ids, lengths, cache_len, rows)


class StepPrograms:
    """The stepwise loop's per-token programs for one model split as (graphdef, state): each
    call passes the state's leaves, with the graph and the state's tree structure bound in the
    program (a static graph and an nnx State as arguments cost about 180 us a call to dispatch
    on this CPU, twice per token). Models of one graph share the compiled programs.

    `front(leaves, tokens (B,), cache) -> (x, blocks)` runs the entries `front` of
    `Transformer.blocks` on the new tokens; `back(leaves, x, blocks, cache, ids, rows, key,
    step, *, sampling, vocab_limit) -> (next tokens, cache)` runs the entries `back`, the head
    and the sampling with fold_in(key, step).
    """

    def __init__(self, graphdef, state, front: range, back: range):
        self.graphdef, self.state = graphdef, state
        self.leaves, treedef = jax.tree.flatten(state)
        self.front, self.back = _step_programs(graphdef, treedef, front, back)


@functools.lru_cache(maxsize=16)
def _step_programs(graphdef, treedef, front: range, back: range):
    merge = lambda leaves: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))

    def front_blocks(leaves, tokens, cache):
        model = merge(leaves)
        added = jnp.ones(tokens.shape, jnp.int32)
        return model.extend_blocks(model.embed_tokens(tokens[:, None]), None, cache, added,
                                   entries=front)

    def back_blocks(leaves, x, blocks, cache, ids, rows, key, step, *, sampling: Sampling,
                    vocab_limit: int):
        model = merge(leaves)
        added = jnp.ones(x.shape[:1], jnp.int32)
        x, blocks = model.extend_blocks(x, ids, {**cache, "blocks": blocks}, added, rows,
                                        entries=back)
        logits = model.head_logits(model.merge(x))[:, 0]
        cache = {"lengths": cache["lengths"] + added, "blocks": blocks}
        tokens = sample_tokens(logits, jax.random.fold_in(key, step), sampling, vocab_limit)
        return tokens, cache

    return (jax.jit(front_blocks),
            jax.jit(back_blocks, static_argnames=("sampling", "vocab_limit")))


@functools.partial(jax.jit, static_argnames=("sampling", "vocab_limit"))
def _first_token(last, key, *, sampling: Sampling, vocab_limit: int):
    return sample_tokens(last, key, sampling, vocab_limit)


class _HostHistory:
    """The last N - 1 compressed tokens of each row, kept on the host (numpy)."""

    def __init__(self, hasher: NgramHasher, history: np.ndarray):
        self.hasher, self.history = hasher, history.copy()

    def hash_ids(self, tokens: np.ndarray) -> dict[int, np.ndarray]:
        """Layer -> int32 (B, 1, K) ids of new tokens (B,), and the history moves on."""
        window = np.concatenate([self.history, self.hasher.compressor(tokens)[:, None]], axis=1)
        ids = {layer: self.hasher.hash_compressed(window, layer)[:, -1:]
               for layer in self.hasher.config.layer_ids}
        self.history = next_history(self.hasher, self.history, tokens)
        return ids


def decode_stepwise(programs: StepPrograms, hasher: NgramHasher | None,
                    tables: HostTables | None, prompt: np.ndarray, prompt_ids: dict,
                    lengths: np.ndarray, history: np.ndarray, key: jax.Array, *,
                    sampling: Sampling, max_new: int, cache_len: int,
                    stop_tokens: tuple[int, ...], vocab_limit: int,
                    on_tokens: Callable | None = None):
    """The decode as one compiled step per token, hashing on the host; with `tables` the
    Engram rows are gathered on the host (and the programs' state holds no table:
    `state_without_tables`), otherwise looked up on the device from the host's ids. Each step
    dispatches `programs.front` (the entries of `Transformer.blocks` before the first with an
    Engram layer), hashes and gathers while it runs, then runs `programs.back`, which samples.
    Other arguments and the results as `decode_on_device` (numpy)."""
    gather = tables.gather if tables is not None else (lambda ids: None)
    last, cache = _prefill_step(programs.graphdef, programs.state, jnp.asarray(prompt),
                                prompt_ids, jnp.asarray(lengths), gather(prompt_ids),
                                cache_len=cache_len)
    tokens = _first_token(last, jax.random.fold_in(key, 0), sampling=sampling,
                          vocab_limit=vocab_limit)
    host_history = _HostHistory(hasher, history) if hasher is not None else None
    batch = prompt.shape[0]
    out = np.full((batch, max_new), -1, np.int32)
    done, count = np.zeros(batch, bool), np.zeros(batch, np.int32)
    for step in range(max_new):
        x, blocks = programs.front(programs.leaves, tokens, cache)  # dispatched
        chosen = np.asarray(tokens)  # waits for the previous step only
        out[:, step] = np.where(done, -1, chosen)
        stop = np.isin(chosen, stop_tokens) & ~done
        count += ~done & ~stop
        if on_tokens is not None:
            on_tokens(chosen, ~done & ~stop)
        done |= stop
        if done.all() or step == max_new - 1:
            break
        ids = host_history.hash_ids(chosen) if host_history is not None else {}
        rows = gather(ids)  # on the host, while the front blocks run
        tokens, cache = programs.back(programs.leaves, x, blocks, cache, ids, rows, key,
                                      step + 1, sampling=sampling, vocab_limit=vocab_limit)
    return out, count, done




@dataclasses.dataclass(frozen=True)
class DecodeResult:
    """Token ids of a decode: int32 (B, max_new) tokens (stop tokens included, then -1),
    int32 (B,) tokens before each row's stop token or end, bool (B,) whether a stop token ended
    the row."""

    tokens: np.ndarray
    counts: np.ndarray
    stopped: np.ndarray


class Decoder:
    """Decodes prompts given as token ids with one model, building once what every decode
    uses: the model's split state, the device hasher's product tables and, with host tables,
    the tables' copy in host memory. It holds the parameters as they are when it is built:
    build another after they change.

    Args:
      model: the `Transformer`.
      hasher: its `NgramHasher` (`data.pipeline.engram_hasher`), None without Engram.
      engram_tables: "device", or "host": the tables are copied to host memory here and the
        device state holds none.

    Raises:
      GenerationError: an unknown `engram_tables`.
    """

    def __init__(self, model: Transformer, hasher: NgramHasher | None, *,
                 engram_tables: str = "device"):
        if engram_tables not in TABLE_PLACES:
            raise GenerationError(f"engram_tables={engram_tables!r} is not one of {TABLE_PLACES}")
        self.config, self.hasher, self.engram_tables = model.config, hasher, engram_tables
        host = engram_tables == "host" and hasher is not None
        self.tables = HostTables(model) if host else None
        self.graphdef, self.state = state_without_tables(model) if host else nnx.split(model)
        first = next((i for i, entry in enumerate(model.blocks) if entry.engram_layers),
                     len(model.blocks))
        self.front, self.back = range(first), range(first, len(model.blocks))

    @functools.cached_property
    def step_programs(self) -> StepPrograms:
        """The stepwise loop's programs (built on first use)."""
        return StepPrograms(self.graphdef, self.state, self.front, self.back)

    @functools.cached_property
    def device_hasher(self) -> DeviceHasher | None:
        """The hasher of the compiled loop (built on first use)."""
        if self.hasher is None:
            return None
        return DeviceHasher(self.hasher, self.config.vocab_size)

    def decode(self, prompts: list[list[int]], *, max_new: int, sampling: Sampling = Sampling(),
               seed: int = 0, stop_tokens: tuple[int, ...] = (), vocab_limit: int | None = None,
               max_length: int | None = None, loop: str | None = None,
               on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None
               ) -> DecodeResult:
        """Continues `prompts` (non-empty lists of ids), padded to
        `prompt_bucket(longest, max_length)`.

        `vocab_limit` is the tokenizer's length (no larger id is sampled); `on_tokens(tokens
        (B,), alive (B,))` is called after every step with the new tokens and the rows they
        extend; `loop` "compiled" or "stepwise" (default compiled for device tables; host
        tables decode stepwise). Other arguments as `generate`."""
        loop = loop or ("stepwise" if self.engram_tables == "host" else "compiled")
        if loop not in ("compiled", "stepwise") or (loop == "compiled" and
                                                    self.engram_tables == "host"):
            raise GenerationError(f"loop={loop!r} with engram_tables={self.engram_tables!r}: "
                                  "host tables decode stepwise; device tables 'compiled' or "
                                  "'stepwise'")
        hasher = self.hasher
        padded = prompt_bucket(max(len(ids) for ids in prompts), max_length)
        prompt = np.zeros((len(prompts), padded), np.int32)
        for row, ids in enumerate(prompts):
            prompt[row, :len(ids)] = ids
        lengths = np.asarray([len(ids) for ids in prompts], np.int32)
        prompt_ids = hasher(prompt) if hasher is not None else {}
        history = (prompt_history(hasher, prompts) if hasher is not None else
                   np.zeros((len(prompts), 0), np.int32))
        settings = dict(sampling=sampling, max_new=max_new, cache_len=padded + max_new,
                        stop_tokens=tuple(stop_tokens),
                        vocab_limit=vocab_limit or self.config.vocab_size)
        key = jax.random.key(seed)
        if loop == "stepwise":
            return DecodeResult(*decode_stepwise(
                self.step_programs, hasher, self.tables, prompt, prompt_ids, lengths, history,
                key, on_tokens=on_tokens, **settings))
        if on_tokens is not None:
            _stream_sink.append(on_tokens)
        try:
            out = decode_on_device(self.graphdef, self.state, self.device_hasher,
                                   jnp.asarray(prompt), prompt_ids, jnp.asarray(lengths),
                                   jnp.asarray(history), key, stream=on_tokens is not None,
                                   **settings)
            return DecodeResult(*jax.device_get(out))
        finally:
            if on_tokens is not None:
                _stream_sink.pop()


def decode_ids(model: Transformer, hasher: NgramHasher | None, prompts: list[list[int]], *,
               engram_tables: str = "device", **settings) -> DecodeResult:
    """One decode of token ids: `Decoder(model, hasher, engram_tables=...).decode(prompts,
    **settings)`. Build a `Decoder` to decode repeatedly."""
    return Decoder(model, hasher, engram_tables=engram_tables).decode(prompts, **settings)


class Generator:
    """Continues text prompts with one model and tokenizer. The hasher (the tokenizer's
    compression) and the `Decoder` are built once, so repeated calls pay only for decoding;
    like the `Decoder`, it holds the parameters as they are when it is built.

    Args:
      model: a trained `Transformer` (e.g. `load_trained(run_dir).model`).
      tokenizer: its tokenizer.
      max_length: the model's maximum length (prompt and new tokens), e.g. the training
        `data.seq_len`; None for no limit.
      eod_token: the training `data.eod_token` (None: the tokenizer's default).
      document_mask: the model was trained with `data.document_mask` (hash ids reset at
        document ends); generation then stays within the prompt's document: a prompt may not
        contain the end-of-document token, which always stops a row.
      engram_tables: "device" or "host" (tables in host memory; the device holds none).

    Raises:
      GenerationError: an unknown `engram_tables`.
    """

    def __init__(self, model: Transformer, tokenizer: TextTokenizer, *,
                 max_length: int | None = None, eod_token: str | None = None,
                 document_mask: bool = False, engram_tables: str = "device"):
        self.tokenizer, self.max_length, self.document_mask = tokenizer, max_length, document_mask
        self.eod_id = end_of_document_id(tokenizer, eod_token)
        hasher = engram_hasher(model.config.engram, tokenizer, self.eod_id, document_mask)
        self.decoder = Decoder(model, hasher, engram_tables=engram_tables)

    def __call__(self, prompts: Sequence[str], *, max_new_tokens: int = 64,
                 sampling: Sampling = Sampling(), seed: int = 0,
                 stop_tokens: Sequence[int] | None = None, loop: str | None = None,
                 on_text: Callable[[int, str], None] | None = None) -> list[Generation]:
        """Continues each prompt.

        Args:
          prompts: texts, each at least one token long.
          max_new_tokens: tokens to generate at most per prompt.
          sampling: greedy by default (`Sampling`).
          seed: PRNG seed of the sampling.
          stop_tokens: token ids that end a row; default the end-of-document token.
          loop: "compiled" (one `lax.while_loop`, tables on the device) or "stepwise" (one
            step per token, hashing on the host); default compiled for device tables,
            stepwise (the only choice) for host tables.
          on_text: called as on_text(row, new_text) as text is produced.

        Returns:
          One `Generation` per prompt.

        Raises:
          GenerationError: an empty prompt, a prompt longer than `max_length`, bad settings.
        """
        tokenizer, max_length, eod_id = self.tokenizer, self.max_length, self.eod_id
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompts:
            raise GenerationError("no prompts given")
        encoded = tokenizer.encode_batch(list(prompts))
        for row, ids in enumerate(encoded):
            if not ids:
                raise GenerationError(f"prompt {row} is empty (it has no tokens)")
            if max_length is not None and len(ids) >= max_length:
                raise GenerationError(f"prompt {row} has {len(ids)} tokens; the model's maximum "
                                      f"length is {max_length}, which leaves no room to "
                                      "generate")
            if self.document_mask and eod_id in ids:
                raise GenerationError(f"prompt {row} contains the end-of-document token "
                                      f"{tokenizer.id_to_token(eod_id)!r}: a model trained with "
                                      "data.document_mask continues one document")
        stop = tuple(sorted(set(stop_tokens if stop_tokens is not None else [eod_id])
                            | ({eod_id} if self.document_mask else set())))
        longest = max(len(ids) for ids in encoded)
        max_new = max_new_tokens if max_length is None else min(max_new_tokens,
                                                                max_length - longest)
        texts = [[] for _ in encoded]
        emitted = [""] * len(encoded)

        def on_tokens(tokens: np.ndarray, alive: np.ndarray) -> None:
            for row in np.flatnonzero(alive):
                texts[row].append(int(tokens[row]))
                text = tokenizer.decode(texts[row])
                if len(text) > len(emitted[row]) and not text.endswith("\ufffd"):
                    on_text(int(row), text[len(emitted[row]):])
                    emitted[row] = text

        result = self.decoder.decode(encoded, max_new=max_new, sampling=sampling, seed=seed,
                                     stop_tokens=stop, vocab_limit=len(tokenizer),
                                     max_length=max_length, loop=loop,
                                     on_tokens=on_tokens if on_text is not None else None)
        results = []
        for row in range(len(encoded)):
            tokens = [int(t) for t in result.tokens[row, :result.counts[row]]]
            results.append(Generation(tokens, tokenizer.decode(tokens),
                                      "stop" if result.stopped[row] else "length"))
            if on_text is not None and len(results[-1].text) > len(emitted[row]):
                on_text(row, results[-1].text[len(emitted[row]):])  # held back: a partial char
        return results


def generate(model: Transformer, tokenizer: TextTokenizer, prompts: Sequence[str], *,
             max_length: int | None = None, eod_token: str | None = None,
             document_mask: bool = False, engram_tables: str = "device",
             **settings) -> list[Generation]:
    """Continues each prompt, once: `Generator(model, tokenizer, max_length=...,
    eod_token=..., document_mask=..., engram_tables=...)(prompts, **settings)` (arguments as
    `Generator` and `Generator.__call__`). Build a `Generator` to generate repeatedly: each
    call of this one rebuilds the tokenizer's compression and, with host tables, copies the
    tables to the host."""
    generator = Generator(model, tokenizer, max_length=max_length, eod_token=eod_token,
                          document_mask=document_mask, engram_tables=engram_tables)
    return generator(prompts, **settings)
