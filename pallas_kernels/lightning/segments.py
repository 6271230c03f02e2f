"""Per-block token positions and segment runs shared by the chunked paths.

Segment rule (see `lightning_attention`): tokens with segment id 0 are padding and
are skipped (no decay, no contribution, output 0); the state resets at a real
token whose id differs from the id of the previous *real* token; the state
entering the call (initial_state) belongs to the first real token's segment.

For block n (tokens n*C .. n*C+C-1), `block_positions` returns two float32 arrays
of shape [batch or 1, num_blocks, C]:

* pos[j]: number of real tokens in the block up to and including j. The decay
  between a source i and a target j >= i of the same run is exp(-s (pos_j - pos_i))
  and the incoming state reaches j decayed by exp(-s pos_j); pos_last is the
  block's decay of the carried state. All differences used are >= 0.
* run[j]: number of resets since the block started, counted up to and including
  j (0: still in the run of the incoming state), or -1 for a padding token.
  Two real tokens interact iff their runs are equal; the incoming state reaches
  j iff run[j] == 0 and it survives the block iff max(run) <= 0.

Values are small integers held exactly in float32 (they are < block size or
< number of tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["block_positions"]


def block_positions(segment_ids: jax.Array | None, time: int, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Returns (pos, run), float32 [B or 1, num_blocks, block_size] each."""
    nb = -(-time // block_size)
    tp = nb * block_size
    if segment_ids is None:  # closed form: pos = j + 1 up to the real length m
        j = jnp.arange(block_size, dtype=jnp.int32)[None, :]
        m = jnp.minimum(block_size, time - block_size * jnp.arange(nb, dtype=jnp.int32))[:, None]
        pos = jnp.minimum(j + 1, m).astype(jnp.float32)[None]
        run = jnp.where(j < m, 0.0, -1.0).astype(jnp.float32)[None]
        return pos, run
    seg = jnp.asarray(segment_ids).astype(jnp.int32)
    seg = jnp.pad(seg, ((0, 0), (0, tp - time)))  # internal tail = padding
    bm = seg.shape[0]
    real = seg != 0
    idx = jnp.where(real, jnp.arange(tp, dtype=jnp.int32)[None], -1)
    last = jax.lax.cummax(idx, axis=1)  # last real index <= t
    prev_last = jnp.concatenate([jnp.full((bm, 1), -1, jnp.int32), last[:, :-1]], axis=1)
    prev_id = jnp.where(prev_last >= 0, jnp.take_along_axis(seg, jnp.maximum(prev_last, 0), axis=1), 0)
    reset = real & (prev_id != 0) & (prev_id != seg)
    cnt = jnp.cumsum(real.astype(jnp.int32), axis=1).reshape(bm, nb, block_size)
    run = jnp.cumsum(reset.astype(jnp.int32), axis=1).reshape(bm, nb, block_size)
    real = real.reshape(bm, nb, block_size)
    zero = jnp.zeros((bm, 1), jnp.int32)
    base_cnt = jnp.concatenate([zero, cnt[:, :-1, -1]], axis=1)[..., None]
    base_run = jnp.concatenate([zero, run[:, :-1, -1]], axis=1)[..., None]
    pos = (cnt - base_cnt).astype(jnp.float32)
    run = jnp.where(real, run - base_run, -1).astype(jnp.float32)
    return pos, run
