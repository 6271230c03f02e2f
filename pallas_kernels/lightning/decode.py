"""One-token decode step of lightning attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from pallas_kernels.platform import targeting_gpu

__all__ = ["DECODE_IMPLS", "lightning_decode_step"]

DECODE_IMPLS = ("auto", "xla", "pallas")

_HI = jax.lax.Precision.HIGHEST


def lightning_decode_step(state: ArrayLike, q: ArrayLike, k: ArrayLike, v: ArrayLike,
                          slopes: ArrayLike, *, impl: str = "auto") -> tuple[jax.Array, jax.Array]:
    """S' = exp(-s) S + k^T v;  o = q S'.

    Args:
      state: float32 [batch, heads, d_k, d_v].
      q, k: [batch, heads, d_k]; v: [batch, heads, d_v] (one token, no time axis).
      slopes: float32 [heads].
      impl: "auto" ("pallas" on GPU or inside `pallas_kernels.platform.gpu_target()`, else "xla"),
        "xla" (jnp), "pallas" (the Pallas GPU kernel, in interpret mode off GPU; it writes the new
        state over the old one's buffer, so donate the state to avoid a copy).

    Returns:
      (o [batch, heads, d_v] in q's dtype, new_state float32 [batch, heads, d_k, d_v]).
    """
    if impl not in DECODE_IMPLS:
        raise ValueError(f"lightning_decode_step: impl must be one of {DECODE_IMPLS}, got {impl!r}")
    state = jnp.asarray(state)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    slopes = jax.lax.stop_gradient(jnp.asarray(slopes, jnp.float32))
    if q.ndim != 3 or k.shape != q.shape or v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            "lightning_decode_step: q, k, v must be [batch, heads, head_dim] with "
            f"equal batch/heads (q and k equal); got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    b, h, dk = q.shape
    dv = v.shape[-1]
    if state.shape != (b, h, dk, dv):
        raise ValueError(
            f"lightning_decode_step: state must be [batch, heads, d_k, d_v] = {(b, h, dk, dv)}, got {state.shape}"
        )
    if slopes.shape != (h,):
        raise ValueError(f"lightning_decode_step: slopes must have shape ({h},), got {slopes.shape}")
    if impl == "pallas" or (impl == "auto" and targeting_gpu()):
        # Imported on first use: the jnp path never loads Pallas.
        from pallas_kernels.lightning.pallas_gpu import decode_step_pallas_gpu

        return decode_step_pallas_gpu(state, q, k, v, slopes, interpret=not targeting_gpu())
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    # exp(-s) S as S + expm1(-s) S: over 10^6 steps a rounded exp(-s) would drift.
    em1 = jnp.expm1(-slopes)[None, :, None, None]
    state = state.astype(jnp.float32)
    new = state + em1 * state + kf[..., :, None] * vf[..., None, :]
    o = jnp.einsum("bhk,bhkv->bhv", qf, new, precision=_HI)
    return o.astype(q.dtype), new
