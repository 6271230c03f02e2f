"""Softmax attention before and after tiling, side by side in one run: ms and GFLOP/s per path.

  python tools/bench_attention.py                 # batch 1, 2,048 tokens, 8 query / 4 KV heads x 64
  python tools/bench_attention.py --batch 8 --no-grad

Paths (each compiled first, then the minimum over ``--repeats`` rounds that alternate old and new):

- ``causal fwd`` / ``causal fwd+bwd``: ``causal_attention`` off TPU, now the tiled path
  (:mod:`m1_jax.layers.causal_tiles`), against the dense ``gqa_attention`` + ``attention_mask`` it replaced
  ([T, T] float32 scores, the masked half computed). The backward is ``jax.grad`` of a sum of squares.
- ``cache prefill``: ``blockwise_attention`` of ``T`` new queries (positions 0..T-1) against a T-slot
  cache, against the previous form that looped over key blocks with all queries in each (so the masked
  upper triangle was computed too).
- ``decode``: one query per row against a cache of ``S`` slots holding ``ctx`` keys.

GFLOP/s count the causal work only: the forward is ``2 * T^2 * heads * head_dim`` per row (two matmuls
over the lower triangle), forward+backward 3x that; a decode step ``4 * ctx * heads * head_dim``. The
last column is the largest absolute difference between the old and new outputs (or gradients).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from m1_jax.layers.attention import attention_mask, gqa_attention  # noqa: E402
from m1_jax.layers.blockwise import blockwise_attention, key_block  # noqa: E402
from m1_jax.layers.causal_tiles import tiled_causal_attention  # noqa: E402


def dense_causal(q, k, v):
    """The full-sequence path before tiling: [T, T] scores under a causal mask."""
    idx = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return gqa_attention(q, k, v, attention_mask(idx, idx))


def key_blocks_only(q, keys, values, q_pos, kv_len, *, block):
    """The cache path before tiling: every query against each key block up to the longest row."""
    B, Tq, H, d = q.shape
    KV = keys.shape[2]
    qg = q.reshape(B, Tq, KV, H // KV, d)
    neg = jnp.float32(-jnp.inf)

    def body(i, carry):
        m, l, acc = carry
        kb = jax.lax.dynamic_slice_in_dim(keys, i * block, block, axis=1)
        vb = jax.lax.dynamic_slice_in_dim(values, i * block, block, axis=1)
        s = jnp.einsum("bqkgd,bskd->bkgqs", qg, kb, preferred_element_type=jnp.float32) / math.sqrt(d)
        kpos = i * block + jnp.arange(block, dtype=jnp.int32)
        mask = (kpos[None, None, :] <= q_pos[:, :, None]) & (kpos[None, None, :] < kv_len[:, None, None])
        mask = mask[:, None, None]
        s = jnp.where(mask, s, neg)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
        corr = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p, vb, preferred_element_type=jnp.float32)
        return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

    shape = (B, KV, H // KV, Tq)
    init = (jnp.full(shape, neg), jnp.zeros(shape, jnp.float32), jnp.zeros((*shape, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, (jnp.max(kv_len) + block - 1) // block, body, init)
    o = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return o.transpose(0, 3, 1, 2, 4).reshape(B, Tq, H, d).astype(q.dtype)


def sum_sq_grad(fn):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))


def best_ms(fns, args, repeats, inner):
    for f in fns:
        jax.block_until_ready(f(*args))
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, f in enumerate(fns):
            for _ in range(inner):
                t = time.perf_counter()
                jax.block_until_ready(f(*args))
                best[i] = min(best[i], (time.perf_counter() - t) * 1e3)
    return best


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--decode-caches", default="2048,8192", help="cache slots of the decode rows, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-grad", action="store_true", help="skip the forward+backward row")
    args = ap.parse_args(argv)
    B, T, H, KV, d = args.batch, args.tokens, args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32))

    q, k, v = normal(B, T, H, d), normal(B, T, KV, d), normal(B, T, KV, d)
    fwd_flops = 2 * T * T * H * d * B
    rows = []  # (path, flops, old fn, new fn, args, inner runs)
    rows.append(("causal fwd", fwd_flops, jax.jit(dense_causal), jax.jit(tiled_causal_attention), (q, k, v), 2))
    if not args.no_grad:
        rows.append(("causal fwd+bwd", 3 * fwd_flops, jax.jit(sum_sq_grad(dense_causal)),
                     jax.jit(sum_sq_grad(tiled_causal_attention)), (q, k, v), 1))
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    lens = jnp.full((B,), T, jnp.int32)
    blk = key_block(T)
    rows.append((f"cache prefill ({T} slots)", fwd_flops, jax.jit(lambda *a, blk=blk: key_blocks_only(*a, block=blk)),
                 jax.jit(lambda *a, blk=blk: blockwise_attention(*a, block=blk)), (q, k, v, pos, lens), 2))
    for S in (int(s) for s in args.decode_caches.split(",") if s):
        ctx = S - S // 16
        kc, vc = normal(B, S, KV, d), normal(B, S, KV, d)
        step = (q[:, :1], kc, vc, jnp.full((B, 1), ctx - 1, jnp.int32), jnp.full((B,), ctx, jnp.int32))
        blk = key_block(S)
        rows.append((f"decode ({ctx} of {S} slots)", 4 * ctx * H * d * B,
                     jax.jit(lambda *a, blk=blk: key_blocks_only(*a, block=blk)),
                     jax.jit(lambda *a, blk=blk: blockwise_attention(*a, block=blk)), step, 20))

    peak = jax.jit(jnp.dot)
    a = normal(2048, 2048)
    mm = best_ms([peak], (a, a), args.repeats, 3)[0]
    print(f"{jax.devices()[0].device_kind}, batch {B}, {T} tokens, {H} query / {KV} KV heads x {d}, float32; "
          f"a 2048^3 jnp.dot runs at {2 * 2048 ** 3 / mm / 1e6:.0f} GFLOP/s here\n")
    print("| path | old ms | old GFLOP/s | new ms | new GFLOP/s | speedup | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, flops, old, new, fargs, inner in rows:
        t_old, t_new = best_ms([old, new], fargs, args.repeats, inner)
        diff = max_diff(old(*fargs), new(*fargs))
        print(f"| {name} | {t_old:.2f} | {flops / t_old / 1e6:.1f} | {t_new:.2f} | {flops / t_new / 1e6:.1f} | "
              f"{t_old / t_new:.1f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
