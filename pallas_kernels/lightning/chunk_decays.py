"""The decay terms of one chunk inside the Pallas kernels, shared by the TPU and the GPU kernels.

From the per-token positions ``pos`` and runs ``run`` of segments.py (see chunked.py for the maths), for
target token j (rows) and source token i (columns) of a chunk and slope s:

  M_ji = exp(-s (pos_j - pos_i))     if j >= i and run_j == run_i >= 0, else 0
  a_j  = exp(-s pos_j)               if run_j == 0 (the incoming state reaches j), else 0
  g    = exp(-s pos_last)            if max(run) <= 0 (the state survives the chunk), else 0
  c_i  = exp(-s (pos_last - pos_i))  if run_i == max(run) >= 0 (i reaches the outgoing state), else 0

Every decay is exp(-s d) with d >= 0, masked before the exp, so nothing overflows. ``reverse=True``
gives the masks of a scan that walks time backwards (the GPU kernels' gradient passes): M transposed
(rows are the earlier tokens), with a and c swapping roles in the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["chunk_decays", "chunk_masks"]


def chunk_masks(p_row: jax.Array, r_row: jax.Array, p_col: jax.Array, r_col: jax.Array, *, reverse: bool = False):
    """Head-independent masks and distances of one chunk.

    p_row, r_row: float32 (1, C), the positions and runs along the columns; p_col, r_col: the same
    values as (C, 1) columns. Returns the tuple that `chunk_decays` takes.
    """
    c_len = p_col.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (c_len, c_len), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (c_len, c_len), 1)
    order = row <= col if reverse else row >= col
    valid = order & (r_col == r_row) & (r_row >= 0.0)
    dist = jnp.where(valid, p_row - p_col if reverse else p_col - p_row, 0.0)
    into = r_col == 0.0
    a_dist = jnp.where(into, p_col, 0.0)
    pm = jnp.max(p_row, axis=1, keepdims=True)  # (1, 1)
    rm = jnp.max(r_row, axis=1, keepdims=True)
    last = (r_col == rm) & (r_col >= 0.0)
    c_dist = jnp.where(last, pm - p_col, 0.0)
    return valid, dist, into, a_dist, pm, rm <= 0.0, last, c_dist


def chunk_decays(s: jax.Array, masks) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(M (C, C), a (C, 1), g (1, 1), c (C, 1)) for slope ``s`` from `chunk_masks`' output."""
    valid, dist, into, a_dist, pm, carry, last, c_dist = masks
    m = jnp.where(valid, jnp.exp(-s * dist), 0.0)
    a = jnp.where(into, jnp.exp(-s * a_dist), 0.0)
    g = jnp.where(carry, jnp.exp(-s * pm), 0.0)
    c = jnp.where(last, jnp.exp(-s * c_dist), 0.0)
    return m, a, g, c
