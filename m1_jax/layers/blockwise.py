"""Softmax attention in (query block, key block) tiles with an online softmax, visiting only the tiles a
query block can see: the attention of new queries against the KV cache (:func:`blockwise_attention`,
prefill chunks and decode steps) and the forward of the full-sequence causal path
(:mod:`m1_jax.layers.causal_tiles`).

Queries are cut into blocks of ``query_block`` tokens; the query heads that share a KV head are stacked
with them, so a tile is one ``[tokens x heads per KV head, head_dim] x [head_dim, key block]`` matmul per
KV head. ``jax.lax.map`` walks the tiles; for each, a ``fori_loop`` whose trip count is computed from the
data walks the key blocks up to the tile's last query position (and its rows' longest ``kv_len``),
carrying a float32 running maximum, sum and output (the FlashAttention recurrence). No ``[time, time]``
score matrix is built and the masked upper triangle is not computed; a decode step reads only the
context the cache holds, not its size.

Measured on a 2-core AMD EPYC (float32, 8 query / 4 KV heads x 64, 2,048 tokens; a 2048^3 ``jnp.dot``
runs at ~210 GFLOP/s there; GFLOP/s count the causal half, ``2 T^2 heads head_dim`` per row):

- tile shape: 512 query rows x 256 keys, 36 ms (120 GFLOP/s) at batch 1; the other combinations of 256,
  512 or 1,024 rows with 128, 256 or 512 keys took 38-69 ms. Eight batch rows in one tile (32 MiB of scores) took 399 ms at batch
  8 against 336 ms row by row, hence ``TILE_BYTES``.
- decode-sized tiles keep the score matmul of the key-block loop this replaced (keys on its long side):
  with the query rows as the long side a decode step was 1.3-1.8x slower.
- before (a loop over key blocks with all queries in each, so the masked upper triangle computed too)
  and after, ``python tools/bench_attention.py``:

  ======================================  ===============================  ===============================
  ``blockwise_attention``                 batch 1                          batch 8
  ======================================  ===============================  ===============================
  prefill, 2,048 new tokens               190 ms (23 GFLOP/s) -> 37 (117)  1,619 ms (21) -> 351 (98)
  decode, 1,920 keys in 2,048 slots       0.33 ms -> 0.33                  3.8 ms -> 3.6
  decode, 7,680 keys in 8,192 slots       1.16 ms -> 1.18                  14.8 ms -> 14.7
  ======================================  ===============================  ===============================
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from m1_jax import sharding

# Largest key block of the blockwise attention over the cache.
MAX_KEY_BLOCK = 512
# Query rows per tile: query tokens x query heads per KV head (the heads sharing a KV head share the keys,
# so they are stacked into one matmul).
QUERY_ROWS = 512
# A float32 score tile with all batch rows up to this size takes them together; beyond it each batch row
# is its own tile (a decode step keeps the batch together, a long prefill goes row by row).
TILE_BYTES = 4 << 20
# Tiles with fewer query rows (decode steps) put the keys on the long side of the score matmul and read
# the cache in blocks of up to MAX_KEY_BLOCK slots; tiles with more (prefill, the full-sequence path) read
# blocks of up to ROWS_KEY_BLOCK keys.
FEW_ROWS = 32
ROWS_KEY_BLOCK = 256


def key_block(max_len: int) -> int:
    """Key block of the blockwise attention: the largest power of two <= 512 dividing ``max_len``."""
    return math.gcd(max_len, MAX_KEY_BLOCK)


def query_block(q_len: int, group: int) -> int:
    """Query tokens per tile for ``group`` query heads per KV head: ``QUERY_ROWS // group``, at most ``q_len``."""
    return max(1, min(q_len, QUERY_ROWS // group))


def rows_per_tile(batch: int, kv_heads: int, q_block: int, group: int, k_block: int) -> int:
    """Batch rows one tile holds: all of them while the float32 scores fit ``TILE_BYTES``, else one.

    Under an active mesh of several devices always all of them: the batch (and head) dimensions then
    stay whole dimensions of every tile, which XLA's partitioner splits across devices; slicing single
    rows out of a sharded batch would gather it on every device."""
    mesh = sharding.active_mesh()
    if mesh is not None and mesh.size > 1:
        return batch
    return batch if batch * kv_heads * q_block * group * k_block * 4 <= TILE_BYTES else 1


def to_tiles(x: jax.Array, q_block: int, kv_heads: int, rows: int) -> jax.Array:
    """[B, T, H, d] -> [tiles, rows, KV, q_block * G, d], zero-padded to whole query blocks.

    Tile ``n`` holds batch rows ``(n // nq) * rows ...`` and query block ``n % nq``; within it row
    ``t * G + g`` is token ``t`` of the block, query head ``g`` of the KV head.
    """
    B, T, H, d = x.shape
    G = H // kv_heads
    nq = -(-T // q_block)
    x = jnp.pad(x, ((0, 0), (0, nq * q_block - T), (0, 0), (0, 0)))
    x = x.reshape(B // rows, rows, nq, q_block, kv_heads, G, d).transpose(0, 2, 1, 4, 3, 5, 6)
    return x.reshape(B // rows * nq, rows, kv_heads, q_block * G, d)


def from_tiles(xt: jax.Array, batch: int, q_len: int, group: int) -> jax.Array:
    """Inverse of :func:`to_tiles`: [tiles, rows, KV, q_block * G, d] -> [B, q_len, H, d]."""
    _, rows, KV, n, d = xt.shape
    q_block = n // group
    x = xt.reshape(batch // rows, -1, rows, KV, q_block, group, d).transpose(0, 2, 1, 4, 3, 5, 6)
    return x.reshape(batch, -1, KV * group, d)[:, :q_len]


def tile_ints(a: jax.Array, q_block: int, group: int, rows: int, fill: int) -> jax.Array:
    """Per-token ints [B, T] (positions, segment ids) -> [tiles, rows, q_block * G] as :func:`to_tiles`."""
    B, T = a.shape
    nq = -(-T // q_block)
    a = jnp.pad(a, ((0, 0), (0, nq * q_block - T)), constant_values=fill)
    a = a.reshape(B // rows, rows, nq, q_block).transpose(0, 2, 1, 3).reshape(-1, rows, q_block)
    return jnp.repeat(a, group, axis=-1)


def key_blocks_seen(qpos_t: jax.Array, kv_len: jax.Array, rows: int, k_block: int, n_slots: int) -> jax.Array:
    """int [tiles]: key blocks a tile visits, up to its last query position and its rows' longest ``kv_len``."""
    lens = jnp.max(kv_len.reshape(-1, rows), axis=1)  # [B // rows]
    lens = jnp.repeat(lens, qpos_t.shape[0] // lens.shape[0])
    hi = jnp.clip(jnp.minimum(jnp.max(qpos_t, axis=(1, 2)) + 1, lens), 0, n_slots)
    return (hi + k_block - 1) // k_block


def tile_mask(qpos: jax.Array, kpos: jax.Array, lens: jax.Array, qseg: jax.Array | None,
              kseg: jax.Array | None) -> jax.Array:
    """[rows, 1, q rows, keys]: key slot at or before the query, below the row's length, same segment."""
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < lens[:, None, None])
    if qseg is not None:
        mask &= qseg[:, :, None] == kseg[:, None, :]
    return mask[:, None]


def forward_tiles(qt: jax.Array, keys: jax.Array, values: jax.Array, qpos_t: jax.Array, kv_len: jax.Array,
                  *, group: int, k_block: int, qseg_t: jax.Array | None = None,
                  kseg: jax.Array | None = None, layer: tuple = ()) -> tuple[jax.Array, jax.Array]:
    """Online-softmax attention of query tiles against the keys, each tile over the key blocks it sees.

    qt [tiles, rows, KV, n, d] (:func:`to_tiles`); keys/values [B, S, KV, d] with ``S`` a multiple of
    ``k_block``; qpos_t int [tiles, rows, n] (:func:`tile_ints`, padding -1); kv_len int [B]; optional
    segment ids qseg_t [tiles, rows, n] and kseg [B, S]. Returns float32 outputs [tiles, rows, KV, n, d]
    (zeros for a query that sees no key) and log-sum-exps [tiles, rows, KV, n] (-inf there).

    ``layer``: integer indices into leading axes of keys/values (the stacked cache of all layers,
    ``[..., B, S, KV, d]``): the key blocks are read from there in place, the cache is never sliced whole.
    """
    n_tiles, rows, KV, n, d = qt.shape
    lead = len(layer)
    S = keys.shape[lead + 1]
    n_groups = kv_len.shape[0] // rows
    nq = n_tiles // n_groups
    scale = 1.0 / math.sqrt(d)
    neg = jnp.float32(-jnp.inf)
    seen = key_blocks_seen(qpos_t, kv_len, rows, k_block, S)
    segments = qseg_t is not None

    def tile(args):
        t, qb, qpos, qseg, n_blocks = args
        b0 = 0 if n_groups == 1 else (t // nq) * rows
        lens = jax.lax.dynamic_slice_in_dim(kv_len, b0, rows)

        def body(j, carry):
            m, l, acc = carry  # [rows, KV, n], [rows, KV, n], [rows, KV, n, d]
            start = j * k_block
            size = (1,) * lead + (rows, k_block, KV, d)
            kb = jax.lax.dynamic_slice(keys, (*layer, b0, start, 0, 0), size).reshape(size[lead:])
            vb = jax.lax.dynamic_slice(values, (*layer, b0, start, 0, 0), size).reshape(size[lead:])
            ks = jax.lax.dynamic_slice(kseg, (b0, start), (rows, k_block)) if segments else None
            kpos = start + jnp.arange(k_block, dtype=jnp.int32)
            mask = tile_mask(qpos, kpos, lens, qseg if segments else None, ks)
            if n < FEW_ROWS:  # a decode-sized tile: the keys are the long side of the matmul
                s = jnp.einsum("bkqgd,bskd->bkgqs", qb.reshape(rows, KV, n // group, group, d), kb,
                               preferred_element_type=jnp.float32)
                s = jnp.swapaxes(s, 2, 3).reshape(rows, KV, n, k_block)
            else:
                s = jnp.einsum("bkrd,bskd->bkrs", qb, kb, preferred_element_type=jnp.float32)
            s = jnp.where(mask, s * scale, neg)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])  # masked scores are -inf: exactly 0
            corr = jnp.exp(m - m_safe)  # 0 while nothing was seen (m = -inf)
            l = l * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkrs,bskd->bkrd", p.astype(values.dtype), vb, preferred_element_type=jnp.float32)
            return m_new, l, acc * corr[..., None] + pv

        init = (jnp.full((rows, KV, n), neg), jnp.zeros((rows, KV, n), jnp.float32),
                jnp.zeros((rows, KV, n, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
        seen_any = l > 0
        o = acc / jnp.where(seen_any, l, 1.0)[..., None]
        lse = jnp.where(seen_any, m + jnp.log(jnp.where(seen_any, l, 1.0)), neg)
        return o, lse

    qseg_arg = qseg_t if segments else jnp.zeros((n_tiles,), jnp.int32)
    args = (jnp.arange(n_tiles), qt, qpos_t, qseg_arg, seen)
    if n_tiles == 1:  # a decode step or a short input: no loop over tiles
        return jax.tree.map(lambda x: x[None], tile(jax.tree.map(lambda x: x[0], args)))
    return jax.lax.map(tile, args)


def blockwise_attention(q: jax.Array, keys: jax.Array, values: jax.Array, q_pos: jax.Array,
                        kv_len: jax.Array, *, block: int, layer: tuple = ()) -> jax.Array:
    """Causal GQA attention of ``q`` against the first ``kv_len`` slots of the cache.

    q [B, Tq, H, d] (already rotated) at cache slots ``q_pos`` int [B, Tq]; keys/values [B, S, KV, d];
    kv_len int [B]: slots ``< kv_len`` hold real keys. Query ``t`` sees slots ``<= q_pos[t]``. A query
    that sees no key gets zeros. Returns [B, Tq, H, d] in q's dtype; the softmax is float32. Keys are
    read in blocks of ``block`` slots (at most ``ROWS_KEY_BLOCK`` for tiles of many query rows); each
    query block reads only the blocks up to its last position. ``layer``: indices into leading axes of
    keys/values when they hold the cache of all layers (read in place, see :func:`forward_tiles`).
    """
    B, Tq, H, _ = q.shape
    S, KV = keys.shape[len(layer) + 1], keys.shape[len(layer) + 2]
    if S % block:
        raise ValueError(f"cache length {S} is not a multiple of the key block {block}")
    G = H // KV
    bq = query_block(Tq, G)
    bk = block if bq * G < FEW_ROWS else math.gcd(block, ROWS_KEY_BLOCK)
    rows = rows_per_tile(B, KV, bq, G, bk)
    qpos_t = tile_ints(q_pos.astype(jnp.int32), bq, G, rows, fill=-1)
    o, _ = forward_tiles(to_tiles(q, bq, KV, rows), keys, values, qpos_t, kv_len.astype(jnp.int32),
                         group=G, k_block=bk, layer=layer)
    return from_tiles(o, B, Tq, G).astype(q.dtype)
