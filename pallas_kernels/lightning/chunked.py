"""Chunked lightning attention in plain jnp/lax (differentiable by autodiff).

For a block of C tokens with local positions pos and runs run (see segments.py),
slope s, incoming state S (float32 [Dk, Dv]):

  O   = ((Q K^T) * M) V + (a * Q) S
  S'  = g S + (c * K)^T V
  M_ji = exp(-s (pos_j - pos_i))  if j >= i and run_j == run_i >= 0, else 0
  a_j  = exp(-s pos_j)            if run_j == 0, else 0
  g    = exp(-s pos_last)         if max(run) <= 0, else 0
  c_i  = exp(-s (pos_last - pos_i)) if run_i == max(run) >= 0, else 0

Without segment ids pos_j = j + 1 (capped at the real length m of a partial last
block) and run = 0 on real tokens, which is M1's chunked prefill. Every decay is
exp(-s d) with d >= 0, masked before the exp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.lightning.segments import block_positions

__all__ = ["lightning_chunked", "block_terms"]

_HI = jax.lax.Precision.HIGHEST


def block_terms(pos: jax.Array, run: jax.Array,
                s: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Decay factors of one block.

    pos, run: float32 [Bm, C]; s: float32 [H]. Returns M [Bm, H, C, C],
    a [Bm, H, C], g [Bm, H], c [Bm, H, C] (all float32, all <= 1).
    """
    c_len = pos.shape[-1]
    s = s[None, :, None]  # [1, H, 1]
    causal = jnp.arange(c_len)[:, None] >= jnp.arange(c_len)[None, :]
    valid = causal[None] & (run[:, :, None] == run[:, None, :]) & (run[:, None, :] >= 0)
    dist = jnp.where(valid, pos[:, :, None] - pos[:, None, :], 0.0)
    m = jnp.where(valid[:, None], jnp.exp(-s[..., None] * dist[:, None]), 0.0)
    into = run == 0
    a = jnp.where(into[:, None], jnp.exp(-s * jnp.where(into, pos, 0.0)[:, None]), 0.0)
    pm = jnp.max(pos, axis=-1)  # [Bm]
    rm = jnp.max(run, axis=-1)  # [Bm]
    g = jnp.where((rm <= 0)[:, None], jnp.exp(-s[:, :, 0] * pm[:, None]), 0.0)
    last = (run == rm[:, None]) & (run >= 0)
    dl = jnp.where(last, pm[:, None] - pos, 0.0)
    c = jnp.where(last[:, None], jnp.exp(-s * dl[:, None]), 0.0)
    return m, a, g, c


def lightning_chunked(q: jax.Array, k: jax.Array, v: jax.Array, slopes: jax.Array, initial_state: jax.Array,
                      segment_ids: jax.Array | None, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Chunked form with lax.scan over blocks. Shapes as in `lightning_attention` (initial_state not None).

    Each block's step is rematerialised in the backward pass: only the state entering each block is kept.
    Returns (o float32 [B, T, H, Dv], final_state float32 [B, H, Dk, Dv]).
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    cb = block_size
    nb = -(-t // cb)
    tp = nb * cb
    pos, run = block_positions(segment_ids, t, cb)  # [Bm, nb, C]
    in_dtype = jnp.result_type(q.dtype, k.dtype)
    low = in_dtype != jnp.float32
    s = slopes.astype(jnp.float32)

    def blocks(x):  # [B, T, H, D] -> [nb, B, H, C, D]
        x = jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
        return x.reshape(b, nb, cb, h, x.shape[-1]).transpose(1, 0, 3, 2, 4)

    @jax.checkpoint
    def step(state, xs):
        qb, kb, vb, pb, rb = xs
        m, a, g, c = block_terms(pb, rb, s)
        if low:
            scores = jnp.einsum("bhjd,bhid->bhji", qb, kb, preferred_element_type=jnp.float32)
        else:
            scores = jnp.einsum("bhjd,bhid->bhji", qb, kb, precision=_HI)
        qf, kf, vf = (x.astype(jnp.float32) for x in (qb, kb, vb))
        o = jnp.einsum("bhji,bhie->bhje", scores * m, vf, precision=_HI)
        o = o + a[..., None] * jnp.einsum("bhjd,bhde->bhje", qf, state, precision=_HI)
        state = g[..., None, None] * state + jnp.einsum("bhid,bhie->bhde", kf * c[..., None], vf, precision=_HI)
        return state, o

    xs = (blocks(q), blocks(k), blocks(v), jnp.moveaxis(pos, 1, 0), jnp.moveaxis(run, 1, 0))
    state, o = jax.lax.scan(step, initial_state.astype(jnp.float32), xs)
    o = o.transpose(1, 0, 3, 2, 4).reshape(b, tp, h, dv)[:, :t]
    return o, state
