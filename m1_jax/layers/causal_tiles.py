"""Full-sequence causal softmax attention in tiles, with its own backward pass: the XLA path of
:func:`m1_jax.layers.attention.causal_attention` (CPU, GPU, and TPU shapes the splash kernel does not take).

The forward is :func:`m1_jax.layers.blockwise.forward_tiles` with query positions ``0 .. T-1``: each query
block visits only the key blocks at or below its last position, and the ``[T, T]`` score matrix is never
built. The backward (a ``jax.custom_vjp``) recomputes each visible tile's probabilities from the saved
log-sum-exps, FlashAttention-2 style: per batch row group, a scan over key blocks accumulates that block's
``dK``/``dV`` over the query blocks that see it and adds each tile's ``dQ`` into a carried accumulator,
so it too touches only the lower triangle. Causality is by index; with ``segment_ids`` a query also sees
only keys of its own segment (masked inside the visited tiles).

Measured side by side on a 2-core AMD EPYC (float32, 8 query / 4 KV heads x 64, 2,048 tokens; a 2048^3
``jnp.dot`` runs at ~210 GFLOP/s there; GFLOP/s count the causal half, ``2 T^2 heads head_dim`` per row
forward and 3x that forward + backward), ``python tools/bench_attention.py``:

=============================  ====================================  ====================
                               dense ``gqa_attention`` (before)      tiles
=============================  ====================================  ====================
forward, batch 1               291 ms (15 GFLOP/s)                   37 ms (116 GFLOP/s)
forward + backward, batch 1    869 ms (15 GFLOP/s)                   153 ms (84 GFLOP/s)
forward, batch 8               2,609 ms (13 GFLOP/s)                 316 ms (109 GFLOP/s)
forward + backward, batch 8    7,588 ms (14 GFLOP/s)                 1,515 ms (68 GFLOP/s)
=============================  ====================================  ====================

The other way to skip the masked half, a static set of pieces (each query block against the whole key
prefix it sees, one masked dense softmax per piece, differentiated by JAX), keeps float32 [query block,
prefix] scores and the softmax's passes over them in memory: in one run at batch 1 it took 72 ms forward
and 274 ms forward + backward where the tiles took 39 and 138 ms (and the dense path 303 and 903 ms).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from m1_jax.layers import blockwise


def _plan(batch: int, seq: int, heads: int, kv_heads: int) -> tuple[int, int, int, int]:
    """(query block, key block, batch rows per tile, padded key length) for a [batch, seq] call."""
    G = heads // kv_heads
    bq = blockwise.query_block(seq, G)
    bk = min(blockwise.ROWS_KEY_BLOCK, seq)
    return bq, bk, blockwise.rows_per_tile(batch, kv_heads, bq, G, bk), -(-seq // bk) * bk


def _tiled_inputs(plan, q, k, v, segment_ids):
    """Query tiles, keys/values padded to whole key blocks, tiled query positions and segment ids."""
    B, T, H, _ = q.shape
    KV = k.shape[2]
    G = H // KV
    bq, _, rows, S = plan
    pad = ((0, 0), (0, S - T), (0, 0), (0, 0))
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    qpos_t = blockwise.tile_ints(idx, bq, G, rows, fill=-1)
    if segment_ids is None:
        qseg_t = kseg = None
    else:
        seg = segment_ids.astype(jnp.int32)
        qseg_t = blockwise.tile_ints(seg, bq, G, rows, fill=-1)
        kseg = jnp.pad(seg, ((0, 0), (0, S - T)), constant_values=-1)
    return blockwise.to_tiles(q, bq, KV, rows), jnp.pad(k, pad), jnp.pad(v, pad), qpos_t, qseg_t, kseg


def _forward(plan, q, k, v, segment_ids):
    B, T, H, _ = q.shape
    G = H // k.shape[2]
    qt, kp, vp, qpos_t, qseg_t, kseg = _tiled_inputs(plan, q, k, v, segment_ids)
    o_t, lse_t = blockwise.forward_tiles(qt, kp, vp, qpos_t, jnp.full((B,), T, jnp.int32), group=G,
                                         k_block=plan[1], qseg_t=qseg_t, kseg=kseg)
    return blockwise.from_tiles(o_t, B, T, G).astype(q.dtype), (q, k, v, segment_ids, o_t, lse_t)


def _backward(plan, res, do):
    q, k, v, segment_ids, o_t, lse_t = res
    B, T, H, d = q.shape
    KV = k.shape[2]
    G = H // KV
    bq, bk, rows, S = plan
    qt, kp, vp, qpos_t, qseg_t, kseg = _tiled_inputs(plan, q, k, v, segment_ids)
    dot = blockwise.to_tiles(do, bq, KV, rows)
    delta = jnp.sum(dot.astype(jnp.float32) * o_t, axis=-1)  # [tiles, rows, KV, n]
    lse = jnp.where(jnp.isfinite(lse_t), lse_t, 0.0)  # padding queries: masked below
    n_tiles, _, _, n, _ = qt.shape
    ng = B // rows
    nq, nk = n_tiles // ng, S // bk
    scale = 1.0 / math.sqrt(d)
    lens = jnp.full((rows,), T, jnp.int32)
    segments = segment_ids is not None

    def per_group(x):
        return None if x is None else x.reshape(ng, nq, *x.shape[1:])

    def per_rows(x):
        return None if x is None else x.reshape(ng, rows, *x.shape[1:])

    def group(args):
        qg, dog, lg, Dg, qposg, qsegg, kg, vg, ksegg = args

        def key_step(dq, j):
            start = j * bk
            kb = jax.lax.dynamic_slice_in_dim(kg, start, bk, axis=1)  # [rows, bk, KV, d]
            vb = jax.lax.dynamic_slice_in_dim(vg, start, bk, axis=1)
            ks = jax.lax.dynamic_slice_in_dim(ksegg, start, bk, axis=1) if segments else None
            kpos = start + jnp.arange(bk, dtype=jnp.int32)

            def body(i, carry):
                dq, dk, dv = carry
                at = lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)
                qb, dob = at(qg), at(dog)
                mask = blockwise.tile_mask(at(qposg), kpos, lens, at(qsegg) if segments else None, ks)
                s = jnp.einsum("bkrd,bskd->bkrs", qb, kb, preferred_element_type=jnp.float32) * scale
                p = jnp.where(mask, jnp.exp(s - at(lg)[..., None]), 0.0)
                dv = dv + jnp.einsum("bkrs,bkrd->bksd", p.astype(dob.dtype), dob,
                                     preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkrd,bskd->bkrs", dob, vb, preferred_element_type=jnp.float32)
                ds = p * (dp - at(Dg)[..., None])
                dq_i = jnp.einsum("bkrs,bskd->bkrd", ds, kb, preferred_element_type=jnp.float32)
                dq = jax.lax.dynamic_update_index_in_dim(dq, at(dq) + dq_i, i, 0)
                dk = dk + jnp.einsum("bkrs,bkrd->bksd", ds, qb, preferred_element_type=jnp.float32)
                return dq, dk, dv

            zeros = jnp.zeros((rows, KV, bk, d), jnp.float32)
            dq, dk, dv = jax.lax.fori_loop(start // bq, nq, body, (dq, zeros, zeros))
            return dq, (dk, dv)

        dq, (dk, dv) = jax.lax.scan(key_step, jnp.zeros((nq, rows, KV, n, d), jnp.float32), jnp.arange(nk))
        return dq, dk, dv

    zero = jnp.zeros((ng,), jnp.int32)  # stands in for absent segment ids
    args = (per_group(qt), per_group(dot), per_group(lse), per_group(delta), per_group(qpos_t),
            per_group(qseg_t) if segments else zero, per_rows(kp), per_rows(vp),
            per_rows(kseg) if segments else zero)
    dq, dk, dv = jax.lax.map(group, args)  # dq [ng, nq, rows, KV, n, d]; dk/dv [ng, nk, rows, KV, bk, d]
    dq = blockwise.from_tiles(dq.reshape(n_tiles, rows, KV, n, d) * scale, B, T, G).astype(q.dtype)

    def keys_back(x):
        return x.transpose(0, 2, 1, 4, 3, 5).reshape(B, S, KV, d)[:, :T]

    return dq, (keys_back(dk) * scale).astype(k.dtype), keys_back(dv).astype(v.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan, q, k, v, segment_ids):
    return _forward(plan, q, k, v, segment_ids)[0]


_attention.defvjp(_forward, _backward)


def tiled_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal GQA attention, q [B, T, H, d], k/v [B, T, KV, d] -> [B, T, H, d]; float32 softmax.

    Query ``t`` sees keys ``<= t`` (of its own segment when ``segment_ids`` [B, T] is given).
    Differentiable in q, k and v.
    """
    B, T, H, _ = q.shape
    return _attention(_plan(B, T, H, k.shape[2]), q, k, v, segment_ids)
