"""The compiled functions of the serving engine; their shapes never change with the load.

Two caches live on the device (:mod:`m1_jax.cache` layout):

* the **slots** cache, ``[slots]`` rows of ``max_context`` tokens: one row per running request. Every
  engine step runs :func:`_decode_step` over all slots at once: each running request's last token is fed
  and its next one sampled (a free slot feeds nothing).
* the **prefill** cache, ``[prefill_rows]`` rows: a request's prompt is fed there chunk by chunk
  (:func:`_prefill_chunk`, chunks of a fixed size aligned at multiples of that size from the prompt's
  start); the first token is sampled from its last logits (:func:`sample`) and the row is copied into
  its slot (:func:`insert`). The prefix cache snapshots a prefill row at chunk
  boundaries (:func:`snapshot`) and restores a snapshot into a prefill row (:func:`restore_block`,
  :func:`restore_state`).

Each slot row is a plain per-slot array sized by ``max_context`` rather than paged blocks: 7 of every 8
layers hold a constant-size lightning state, so only the softmax layers' keys and values grow with the
context; a slot costs the same whatever its request's length, which keeps every shape static.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from m1_jax.cache import Cache
from m1_jax.sampling import sample_rows

# Top log-probabilities computed for every slot at every step (OpenAI allows at most 20 per token).
TOP_LOGPROBS = 20
_BATCH_AXIS = Cache(lightning=2, keys=2, values=2, lengths=0)


def _row_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """One random key per row: the request's seed (two uint32 halves) folded with its token counter."""
    def one(seed, count):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed[0]), seed[1]), count)
    return jax.vmap(one)(seeds, counters)


def _sample(logits, temperature, top_k, top_p, seeds, counters):
    tok = sample_rows(logits, _row_keys(seeds, counters), temperature, top_k, top_p)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp, tok[:, None], axis=1)[:, 0]
    top_lp, top_ids = lax.top_k(logp, TOP_LOGPROBS)
    return tok, lp, top_ids.astype(jnp.int32), top_lp


@jax.jit
def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, seeds: jax.Array,
           counters: jax.Array):
    """One token per row of ``logits`` [rows, vocab] with each row's parameters -> (tokens int32 [rows], their
    log-probabilities float32 [rows], top ids int32 [rows, TOP_LOGPROBS], top log-probabilities).
    Log-probabilities are the model's (temperature 1). ``seeds`` uint32 [rows, 2] and ``counters`` (the
    token's index in its request) make each row's random key."""
    return _sample(logits, temperature, top_k, top_p, seeds, counters)


def _decode_step(graphdef: nnx.GraphDef, params: nnx.State, cache: Cache, tokens: jax.Array, previous: jax.Array,
                chained: jax.Array, active: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                seeds: jax.Array, counters: jax.Array):
    """Feeds each active slot its last token and samples the next one from the logits -> (cache,
    :func:`sample`'s four outputs). The last token is ``previous`` [slots] (what the previous step sampled,
    still on the device) where ``chained``, else ``tokens`` [slots]. A free slot, or one whose cache is full,
    feeds nothing."""
    feed = active & (cache.lengths < cache.max_len)
    tokens = jnp.where(chained, previous, tokens)
    out = nnx.merge(graphdef, params).forward(tokens[:, None], cache=cache, n_valid=feed.astype(jnp.int32),
                                              last_only=True)
    return (out.cache, *_sample(out.logits[:, 0], temperature, top_k, top_p, seeds, counters))


def _prefill_chunk(graphdef: nnx.GraphDef, params: nnx.State, cache: Cache, logits: jax.Array, ids: jax.Array,
                  n_valid: jax.Array) -> tuple[Cache, jax.Array]:
    """Feeds ``ids`` [rows, T] (the first ``n_valid`` of each row real) into the prefill cache; a row's
    logits [vocab] become those at its last real token (unchanged for a row that feeds nothing)."""
    out = nnx.merge(graphdef, params).forward(ids, cache=cache, n_valid=n_valid, last_only=True)
    return out.cache, jnp.where((n_valid > 0)[:, None], out.logits[:, 0], logits)


class ModelSteps(NamedTuple):
    """The compiled steps that run the model, its structure bound."""

    decode_step: Callable  # (params, cache, tokens, previous, chained, active, temperature, top_k, top_p, seeds,
    #                         counters) -> (cache, tokens, logprobs, top ids, top logprobs); see _decode_step
    prefill_chunk: Callable  # (params, cache, logits, ids, n_valid) -> (cache, logits); see _prefill_chunk


@functools.lru_cache(maxsize=16)
def for_model(graphdef: nnx.GraphDef) -> ModelSteps:
    """:class:`ModelSteps` of a model structure. The structure is bound here rather than passed to each call
    as a static argument: hashing a model's GraphDef costs a fraction of a millisecond, at every step."""
    return ModelSteps(jax.jit(functools.partial(_decode_step, graphdef), donate_argnames=("cache",)),
                      jax.jit(functools.partial(_prefill_chunk, graphdef), donate_argnames=("cache", "logits")))


def _take_row(x: jax.Array, row, axis: int) -> jax.Array:
    return lax.dynamic_index_in_dim(x, row, axis, keepdims=True)


def _put_row(dst: jax.Array, piece: jax.Array, row, axis: int) -> jax.Array:
    return lax.dynamic_update_index_in_dim(dst, piece.astype(dst.dtype), row, axis)


@functools.partial(jax.jit, donate_argnames=("cache",))
def insert(cache: Cache, pcache: Cache, row, slot) -> Cache:
    """Copies prefill row ``row`` (lightning states, keys, values, length) into slot ``slot``."""
    return jax.tree.map(lambda d, s, ax: _put_row(d, _take_row(s, row, ax), slot, ax), cache, pcache, _BATCH_AXIS)


@functools.partial(jax.jit, donate_argnames=("pcache",))
def reset_row(pcache: Cache, row) -> Cache:
    """An empty prefill row: zero lightning state, length 0 (stale keys past the length are never read)."""
    state = _put_row(pcache.lightning, jnp.zeros_like(_take_row(pcache.lightning, row, 2)), row, 2)
    return pcache.replace(lightning=state, lengths=pcache.lengths.at[row].set(0))


@functools.partial(jax.jit, static_argnames=("block",))
def snapshot(pcache: Cache, plogits: jax.Array, row, end, *, block: int):
    """What the prefix cache keeps at a chunk boundary ``end`` of prefill row ``row``: the lightning states
    after token ``end`` [periods, layers, 1, heads, d, d], the keys and values of tokens ``end - block`` ..
    ``end`` [periods, layers, 1, block, kv_heads, d] and the logits at token ``end - 1`` [vocab] (copies)."""
    kv = [lax.dynamic_slice_in_dim(_take_row(x, row, 2), end - block, block, axis=3)
          for x in (pcache.keys, pcache.values)]
    return _take_row(pcache.lightning, row, 2), kv[0], kv[1], plogits[row]


@functools.partial(jax.jit, donate_argnames=("pcache",))
def restore_block(pcache: Cache, row, start, keys: jax.Array, values: jax.Array) -> Cache:
    """Writes a snapshot's keys and values into prefill row ``row`` at token ``start``."""
    def put(dst, piece):
        r = _take_row(dst, row, 2)
        return _put_row(dst, lax.dynamic_update_slice_in_dim(r, piece.astype(r.dtype), start, axis=3), row, 2)
    return pcache.replace(keys=put(pcache.keys, keys), values=put(pcache.values, values))


@functools.partial(jax.jit, donate_argnames=("pcache", "plogits"))
def restore_state(pcache: Cache, plogits: jax.Array, row, lightning: jax.Array, logits: jax.Array, length):
    """Sets prefill row ``row`` to a snapshot's lightning states, length and last logits."""
    pcache = pcache.replace(lightning=_put_row(pcache.lightning, lightning, row, 2),
                            lengths=pcache.lengths.at[row].set(length))
    return pcache, plogits.at[row].set(logits)
