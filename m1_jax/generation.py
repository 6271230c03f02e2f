"""Prefill, decode and sampling for :class:`m1_jax.M1Model` with the inference cache.

* :func:`prefill` feeds prompts (a batch of different lengths, on top of an existing cache or a new
  one) in fixed-size chunks: lightning layers run the chunked op from the carried state, softmax layers
  write their keys into the KV cache and attend blockwise, so memory is bounded by the chunk.
* :func:`decode_step` feeds one token per row (lightning: the one-token recurrence).
* :func:`generate` = prefill + a compiled ``while_loop`` of sample / feed steps; rows stop on their own.

Prefill followed by decode steps equals one forward over the whole sequence. Token buffers and cache
lengths are bucketed (powers of two) so that asking for a different number of tokens in the same
bucket compiles nothing new.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1_jax.cache import Cache, CacheError, init_cache, round_max_len
from m1_jax.sampling import SamplingParams, sample

DEFAULT_CHUNK = 2048


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(int(n), 1) - 1).bit_length())


def _feed(model, cache: Cache, ids: jax.Array, n_valid: jax.Array) -> tuple[Cache, jax.Array]:
    """Feeds ``ids`` [B, T] (the first ``n_valid`` of each row real) -> (cache, logits [B, vocab] at each
    row's last real token): the model's own cached forward."""
    out = model.forward(ids, cache=cache, n_valid=n_valid, last_only=True)
    return out.cache, out.logits[:, 0]


# The cache argument is donated: its buffers are reused for the updated cache (no second copy of the KV
# caches on the device), so a cache passed to prefill / decode_step / generate is consumed.
@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _feed_jit(graphdef: nnx.GraphDef, params: nnx.State, cache: Cache, ids: jax.Array,
              n_valid: jax.Array) -> tuple[Cache, jax.Array]:
    return _feed(nnx.merge(graphdef, params), cache, ids, n_valid)


def _check_ids(model, ids: np.ndarray, lengths: np.ndarray) -> None:
    V = model.cfg.vocab_size
    for b in range(ids.shape[0]):
        row = ids[b, : lengths[b]]
        bad = row[(row < 0) | (row >= V)]
        if bad.size:
            raise ValueError(f"prompt row {b}: token id {int(bad[0])} is outside the vocabulary [0, {V})")


def _check_integers(a: np.ndarray, what: str) -> None:
    if a.size and (a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{what} must hold integer token ids, got {a.dtype} (e.g. {a.reshape(-1)[0]!r})")


def _token_row(row, what: str) -> np.ndarray:
    """One prompt of a list of prompts: a 1-D sequence of integer token ids."""
    a = np.asarray(row)
    if a.ndim != 1:
        raise ValueError(f"{what} must be a flat list of token ids, got shape {list(a.shape)}")
    _check_integers(a, what)
    return a


def as_batch(prompt_ids, lengths=None) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (right-padded int32 [batch, max_len], lengths int32 [batch]).

    Accepts a list of token-id lists (different lengths), a 1-D sequence (one prompt) or a 2-D array
    with optional per-row ``lengths`` (real tokens first, padding after)."""
    if isinstance(prompt_ids, (list, tuple)) and prompt_ids and isinstance(prompt_ids[0], (list, tuple, np.ndarray)):
        rows = [_token_row(r, f"prompt_ids[{b}]") for b, r in enumerate(prompt_ids)]
        lens = np.array([len(r) for r in rows], np.int32)
        ids = np.zeros((len(rows), max(int(lens.max()), 1)), np.int64)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
        if lengths is not None:
            raise ValueError("lengths goes with a padded [batch, time] array, not a list of token lists")
    else:
        ids = np.asarray(prompt_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"prompt_ids must be [batch, time] or a list of token lists, got shape {ids.shape}")
        _check_integers(ids, "prompt_ids")
        lens = np.full((ids.shape[0],), ids.shape[1], np.int32) if lengths is None else np.asarray(lengths, np.int32)
        if lens.shape != (ids.shape[0],) or (lens > ids.shape[1]).any() or (lens < 0).any():
            raise ValueError(f"lengths must be [batch] = [{ids.shape[0]}] within 0..{ids.shape[1]}, got {lens}")
    if ids.shape[0] == 0:
        raise ValueError("empty prompt batch")
    if (lens == 0).any():
        raise ValueError(f"empty prompt in row {int(np.argmin(lens))}: every row needs at least one token")
    return ids.astype(np.int64), lens


def prefill(model, prompt_ids, *, lengths=None, cache: Cache | None = None, max_len: int | None = None,
            chunk_size: int = DEFAULT_CHUNK) -> tuple[Cache, jax.Array]:
    """Feeds prompts into ``cache`` (a new one of ``max_len`` slots when None) in chunks.

    Continues on top of an existing cache (multi-turn): each row's new tokens follow its ``lengths``.
    The cache passed in is consumed (its buffers are donated to the result).
    Returns (cache, float32 logits [batch, vocab] at each row's last prompt token).
    """
    ids, lens = as_batch(prompt_ids, lengths)
    _check_ids(model, ids, lens)
    B = ids.shape[0]
    if cache is None:
        cache = init_cache(model.cfg, B, max_len or int(lens.max()), dtype=model.dtype, mesh=model.mesh)
    if cache.batch_size != B:
        raise CacheError(f"the cache holds {cache.batch_size} rows but {B} prompts were given")
    have = np.asarray(cache.lengths)
    if (have + lens > cache.max_len).any():
        b = int(np.argmax(have + lens))
        raise CacheError(f"prompt of {int(lens[b])} tokens (row {b}, {int(have[b])} already in the cache) does "
                         f"not fit the cache of {cache.max_len} tokens; use a larger max_len")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    T = min(_bucket(int(lens.max()), 8), _bucket(chunk_size, 1))
    n_chunks = -(-int(lens.max()) // T)
    ids = np.pad(ids, ((0, 0), (0, n_chunks * T - ids.shape[1])))
    graphdef, params = nnx.split(model)
    logits = None
    for c in range(n_chunks):
        n_valid = np.clip(lens - c * T, 0, T).astype(np.int32)
        cache, lg = _feed_jit(graphdef, params, cache, jnp.asarray(ids[:, c * T:(c + 1) * T], jnp.int32),
                                 jnp.asarray(n_valid))
        logits = lg if logits is None else jnp.where(jnp.asarray(n_valid > 0)[:, None], lg, logits)
    return cache, logits


def decode_step(model, cache: Cache, tokens, valid=None) -> tuple[Cache, jax.Array]:
    """Feeds one token per row (``valid`` bool [batch]: rows to advance, default all) ->
    (cache, float32 logits [batch, vocab]). The cache passed in is consumed (donated)."""
    tokens = jnp.asarray(tokens, jnp.int32).reshape(-1, 1)
    n_valid = jnp.ones((tokens.shape[0],), jnp.int32) if valid is None else jnp.asarray(valid).astype(jnp.int32)
    if (np.asarray(cache.lengths) + np.asarray(n_valid) > cache.max_len).any():
        raise CacheError(f"the cache of {cache.max_len} tokens is full")
    graphdef, params = nnx.split(model)
    return _feed_jit(graphdef, params, cache, tokens, n_valid)


@dataclasses.dataclass
class Generation:
    """What :func:`generate` returns with ``return_logprobs``/``return_logits``/``return_cache``."""

    tokens: jax.Array      # int32 [batch, new]; after a row stops: pad_token_id
    num_tokens: jax.Array  # int32 [batch]: tokens generated per row, the stopping token included
    logprobs: jax.Array    # float32 [batch, new]: log softmax of the model's logits (temperature 1) at the token
    logits: jax.Array | None  # float32 [batch, new, vocab] (return_logits) that produced each token
    cache: Cache           # prompt + generated tokens except each row's last one (it was not fed)


def _stop_hit(tokens, i, stop):
    """bool [B]: does a stop sequence end at buffer position ``i``?

    ``stop`` int32 [n, L]: sequences right-aligned, -1 before a shorter one; an all -1 row never matches."""
    n, L = stop.shape
    idx = i - L + 1 + jnp.arange(L)
    window = jnp.take(tokens, jnp.maximum(idx, 0), axis=1)  # [B, L]
    used = stop >= 0  # [n, L]
    ok = (window[:, None, :] == stop[None]) & (idx >= 0)[None, None, :]
    match = jnp.all(ok | ~used[None], axis=-1) & jnp.any(used, axis=-1)[None]
    return jnp.any(match, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "n_buf", "greedy", "return_logits"),
                   donate_argnames=("cache",))
def _generate_loop(graphdef, params, cache, logits, key, max_new, sp_arrays, pad_id, stop, *, n_buf, greedy,
                   return_logits):
    model = nnx.merge(graphdef, params)
    B, V = logits.shape
    temperature, top_k, top_p = sp_arrays

    def cond(c):
        i, done = c[0], c[5]
        return (i < max_new) & ~jnp.all(done)

    def body(c):
        i, cache, logits, tokens, logprobs, done, count, all_logits = c
        tok = sample(logits, jax.random.fold_in(key, i), temperature, top_k, top_p, greedy=greedy)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=1)[:, 0]
        tok = jnp.where(done, pad_id, tok)
        tokens = tokens.at[:, i].set(tok)
        logprobs = logprobs.at[:, i].set(jnp.where(done, 0.0, lp))
        if return_logits:
            all_logits = all_logits.at[:, i].set(logits)
        count = count + (~done).astype(jnp.int32)
        stopped = done | _stop_hit(tokens, i, stop) | (i + 1 >= max_new)
        feed = ~stopped

        def advance(cache):
            return _feed(model, cache, tok[:, None], feed.astype(jnp.int32))

        cache, logits = jax.lax.cond(jnp.any(feed), advance, lambda cache: (cache, logits), cache)
        return i + 1, cache, logits, tokens, logprobs, stopped, count, all_logits

    init = (jnp.int32(0), cache, logits, jnp.full((B, n_buf), pad_id, jnp.int32), jnp.zeros((B, n_buf), jnp.float32),
            jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32),
            jnp.zeros((B, n_buf, V), jnp.float32) if return_logits else None)
    _, cache, _, tokens, logprobs, _, count, all_logits = jax.lax.while_loop(cond, body, init)
    return tokens, count, logprobs, all_logits, cache


def _stop_sequences(eos_token_id, stop) -> tuple[tuple[int, ...], ...]:
    seqs = []
    if eos_token_id is not None:
        for e in np.atleast_1d(eos_token_id).tolist():
            seqs.append((int(e),))
    for s in stop or ():
        s = (int(s),) if isinstance(s, (int, np.integer)) else tuple(int(t) for t in s)
        if not s:
            raise ValueError("stop sequences must not be empty")
        seqs.append(s)
    return tuple(dict.fromkeys(seqs))


def _stop_array(seqs) -> np.ndarray:
    """int32 [n, L] right-aligned, -1 filled; at least [4, 4] so that usual stop sets share one compile."""
    n = max(4, _bucket(len(seqs), 1))
    L = max(4, _bucket(max((len(s) for s in seqs), default=1), 1))
    out = np.full((n, L), -1, np.int32)
    for r, s in enumerate(seqs):
        out[r, L - len(s):] = s
    return out


def _start(model, prompt_ids, lengths, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id, stop,
           cache: Cache | None, max_len: int | None, chunk_size: int, *, single: bool = False):
    """What :func:`generate` and :func:`stream` share: checks the arguments, makes (or checks the room of)
    the cache and prefills the prompts -> (sampling params, random key, stop sequences, cache, last logits)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    sp = SamplingParams.create(temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=model.cfg.vocab_size)
    stop_seqs = _stop_sequences(eos_token_id, stop)
    ids, lens = as_batch(prompt_ids, lengths)
    if single and ids.shape[0] != 1:
        raise ValueError(f"stream takes one prompt, got {ids.shape[0]}")
    held = 0 if cache is None else int(np.asarray(cache.lengths).max())
    limit = model.cfg.max_position_embeddings
    if held + int(lens.max()) + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens={max_new_tokens} after a prompt of {int(lens.max())} tokens"
                         f"{f' (and {held} in the cache)' if held else ''} exceeds the model's "
                         f"max_position_embeddings={limit}")
    if cache is None:
        need = int(lens.max()) + max_new_tokens
        cache = init_cache(model.cfg, ids.shape[0], max(max_len or 0, round_max_len(_bucket(need, 64))),
                           dtype=model.dtype, mesh=model.mesh)
    else:
        room = cache.max_len - (np.asarray(cache.lengths) + lens).max()
        if room < max_new_tokens - 1:
            raise CacheError(f"the cache of {cache.max_len} tokens has room for {max(int(room) + 1, 0)} new tokens "
                             f"after the prompt, {max_new_tokens} were asked")
    cache, logits = prefill(model, ids, lengths=lens, cache=cache, chunk_size=chunk_size)
    return sp, jax.random.key(int(seed)), stop_seqs, cache, logits


def generate(model, prompt_ids, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, eos_token_id: int | Sequence[int] | None = None,
             stop: Sequence[Sequence[int] | int] | None = None, lengths=None, pad_token_id: int | None = None,
             cache: Cache | None = None, max_len: int | None = None, chunk_size: int = DEFAULT_CHUNK,
             return_logprobs: bool = False, return_logits: bool = False, return_cache: bool = False):
    """Generates up to ``max_new_tokens`` per prompt -> int32 [batch, max_new_tokens].

    ``prompt_ids``: a list of token-id lists (different lengths) or an int array [batch, time] with
    optional per-row ``lengths``; each row gets what it would get alone. ``temperature`` 0 is greedy
    (argmax); otherwise sampling with optional ``top_k`` / ``top_p`` (nucleus), seeded by ``seed``.
    A row stops after ``eos_token_id`` (one id or several) or after any ``stop`` sequence of token ids
    (the stopping tokens are included); later positions hold ``pad_token_id`` (default: the first eos
    id, else 0). ``cache``: continue on top of an existing cache (multi-turn; it is consumed, and
    ``return_cache`` gives the extended one back). With any ``return_*`` flag a :class:`Generation` is
    returned instead of the tokens.
    """
    sp, key, stop_seqs, cache, logits = _start(model, prompt_ids, lengths, max_new_tokens, temperature, top_k,
                                               top_p, seed, eos_token_id, stop, cache, max_len, chunk_size)
    if pad_token_id is None:
        pad_token_id = stop_seqs[0][0] if eos_token_id is not None else 0
    n_buf = _bucket(max_new_tokens)
    graphdef, params = nnx.split(model)
    tokens, count, logprobs, all_logits, cache = _generate_loop(
        graphdef, params, cache, logits, key, jnp.int32(max_new_tokens), sp.arrays(),
        jnp.int32(pad_token_id), jnp.asarray(_stop_array(stop_seqs)), n_buf=n_buf, greedy=sp.greedy,
        return_logits=return_logits)
    tokens = tokens[:, :max_new_tokens]
    if not (return_logprobs or return_logits or return_cache):
        return tokens
    return Generation(tokens=tokens, num_tokens=count, logprobs=logprobs[:, :max_new_tokens],
                      logits=None if all_logits is None else all_logits[:, :max_new_tokens], cache=cache)


def stream(model, prompt_ids, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, eos_token_id=None, stop=None, cache: Cache | None = None,
           max_len: int | None = None, chunk_size: int = DEFAULT_CHUNK) -> Iterator[tuple[int, Cache]]:
    """One prompt, tokens yielded as they come: ``(token, cache)`` per step (a jitted fixed-shape step,
    compiled once). Stops after eos / a stop sequence (yielded) or ``max_new_tokens``. Each yielded
    cache is consumed by the next step: keep the last one."""
    sp, key, stop_seqs, cache, logits = _start(model, prompt_ids, None, max_new_tokens, temperature, top_k, top_p,
                                               seed, eos_token_id, stop, cache, max_len, chunk_size, single=True)
    graphdef, params = nnx.split(model)
    out: list[int] = []
    for i in range(max_new_tokens):
        tok = int(_sample_jit(logits, jax.random.fold_in(key, i), sp.arrays(), greedy=sp.greedy)[0])
        out.append(tok)
        done = any(tuple(out[-len(s):]) == s for s in stop_seqs) or i + 1 == max_new_tokens
        if not done:
            if int(cache.lengths[0]) >= cache.max_len:
                raise CacheError(f"the cache of {cache.max_len} tokens is full")
            cache, logits = _feed_jit(graphdef, params, cache, jnp.asarray([[tok]], jnp.int32),
                                      jnp.ones((1,), jnp.int32))
        yield tok, cache
        if done:
            return


@functools.partial(jax.jit, static_argnames=("greedy",))
def _sample_jit(logits, key, sp_arrays, *, greedy):
    return sample(logits, key, *sp_arrays, greedy=greedy)
