"""Softmax attention of new queries against a KV cache, one key block at a time (online softmax).

Never builds a ``[time, time]`` score matrix: keys are read in blocks of ``block`` slots and a float32
running maximum, running sum and output accumulator are carried across blocks (the FlashAttention
recurrence), so memory is ``O(queries x block)``. Only the blocks up to the longest row are visited,
so a decode step costs the context actually held, not the cache size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Largest key block of the blockwise attention over the cache.
MAX_KEY_BLOCK = 512


def key_block(max_len: int) -> int:
    """Key block of the blockwise attention: the largest power of two <= 512 dividing ``max_len``."""
    return math.gcd(max_len, MAX_KEY_BLOCK)


def blockwise_attention(q: jax.Array, keys: jax.Array, values: jax.Array, q_pos: jax.Array,
                        kv_len: jax.Array, *, block: int) -> jax.Array:
    """Causal GQA attention of ``q`` against the first ``kv_len`` slots of the cache.

    q [B, Tq, H, d] (already rotated) at cache slots ``q_pos`` int [B, Tq]; keys/values [B, S, KV, d];
    kv_len int [B]: slots ``< kv_len`` hold real keys. Query ``t`` sees slots ``<= q_pos[t]``. A query
    that sees no key gets zeros. Returns [B, Tq, H, d] in q's dtype; the softmax is float32.
    """
    B, Tq, H, d = q.shape
    S, KV = keys.shape[1], keys.shape[2]
    if S % block:
        raise ValueError(f"cache length {S} is not a multiple of the key block {block}")
    G = H // KV
    qg = q.reshape(B, Tq, KV, G, d)
    scale = 1.0 / math.sqrt(d)
    n_blocks = (jnp.max(kv_len) + block - 1) // block
    neg = jnp.float32(-jnp.inf)

    def body(i, carry):
        m, l, acc = carry  # [B, KV, G, Tq], [B, KV, G, Tq], [B, KV, G, Tq, d]
        kb = jax.lax.dynamic_slice_in_dim(keys, i * block, block, axis=1)
        vb = jax.lax.dynamic_slice_in_dim(values, i * block, block, axis=1)
        s = jnp.einsum("bqkgd,bskd->bkgqs", qg, kb, preferred_element_type=jnp.float32) * scale
        kpos = i * block + jnp.arange(block, dtype=jnp.int32)
        mask = (kpos[None, None, :] <= q_pos[:, :, None]) & (kpos[None, None, :] < kv_len[:, None, None])
        mask = mask[:, None, None]  # [B, 1, 1, Tq, block]
        s = jnp.where(mask, s, neg)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
        corr = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
        l = l * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(values.dtype), vb, preferred_element_type=jnp.float32)
        acc = acc * corr[..., None] + pv
        return m_new, l, acc

    init = (jnp.full((B, KV, G, Tq), neg), jnp.zeros((B, KV, G, Tq), jnp.float32),
            jnp.zeros((B, KV, G, Tq, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    o = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return o.transpose(0, 3, 1, 2, 4).reshape(B, Tq, H, d).astype(q.dtype)
