"""The public lightning attention op: validation and dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from pallas_kernels.lightning.chunked import lightning_chunked
from pallas_kernels.lightning.reference import lightning_reference
from pallas_kernels.platform import targeting_gpu, targeting_tpu

__all__ = ["IMPLS", "lightning_attention", "resolve_impl"]

IMPLS = ("auto", "reference", "xla", "pallas")


def resolve_impl(impl: str) -> str:
    """What impl="auto" runs: Pallas kernels on TPU and GPU, the chunked XLA path elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if targeting_tpu() or targeting_gpu() else "xla"
    return impl


def _validate(q: jax.Array, k: jax.Array, v: jax.Array, slopes: jax.Array, initial_state: jax.Array | None,
              segment_ids: jax.Array | None, block_size: int) -> None:
    if q.ndim != 4:
        raise ValueError(f"lightning_attention: q must be [batch, time, heads, head_dim], got shape {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"lightning_attention: k shape {k.shape} must equal q shape {q.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"lightning_attention: v must be [batch, time, heads, d_v] matching q's {q.shape[:3]}, got {v.shape}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"lightning_attention: {name} must be floating, got {x.dtype}")
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if slopes.shape != (h,):
        raise ValueError(f"lightning_attention: slopes must have shape (heads,) = ({h},), got {slopes.shape}")
    if initial_state is not None and initial_state.shape != (b, h, dk, dv):
        raise ValueError(
            f"lightning_attention: initial_state must be [batch, heads, d_k, d_v] = "
            f"{(b, h, dk, dv)}, got {initial_state.shape}"
        )
    if segment_ids is not None:
        if segment_ids.shape != (b, t):
            raise ValueError(
                f"lightning_attention: segment_ids must be [batch, time] = {(b, t)}, got {segment_ids.shape}"
            )
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"lightning_attention: segment_ids must be integers, got {segment_ids.dtype}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"lightning_attention: block_size must be a positive int, got {block_size!r}")


def lightning_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, slopes: ArrayLike, *,
                        initial_state: ArrayLike | None = None, segment_ids: ArrayLike | None = None,
                        block_size: int = 256, impl: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Lightning attention (linear attention with per-head exponential decay).

    Per batch row and head, with row vectors q_t, k_t, v_t and state S [d_k, d_v]:
      S_t = exp(-s) S_{t-1} + k_t^T v_t,   o_t = q_t S_t
    (no scaling, no normalizer), S_{-1} = initial_state (zeros when None).

    Args:
      q, k: [batch, time, heads, d_k]; v: [batch, time, heads, d_v]; any float
        dtype (internal math in float32; o has q's dtype).
      slopes: float32 [heads] (may be a shard of the model's heads). Treated as
        constants: no gradient flows to them.
      initial_state: optional float32 [batch, heads, d_k, d_v].
      segment_ids: optional int [batch, time]. Id 0 marks padding: such tokens are
        skipped entirely (no decay, no contribution, output 0), so padding anywhere
        leaves the real tokens' results as without it. The state resets to zero at
        a real token whose id differs from the previous real token's id;
        initial_state flows into the segment of the first real token.
      block_size: chunk length of the chunked paths (time need not be a multiple). The GPU kernels
        round it down to a power of two in [16, 64] (`pallas_gpu.gpu_chunk`).
      impl: "auto" (Pallas on TPU and GPU, or inside `pallas_kernels.platform.tpu_target()` /
        `gpu_target()`, else "xla"), "reference" (token recurrence), "xla" (chunked, autodiff),
        "pallas" (the Mosaic TPU kernels on TPU, the Triton GPU kernels on GPU; off both, the TPU
        kernels in interpret mode).

    Returns:
      (o [batch, time, heads, d_v] in q's dtype, final_state float32
      [batch, heads, d_k, d_v]: the state after the last real token).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    slopes = jnp.asarray(slopes)
    if initial_state is not None:
        initial_state = jnp.asarray(initial_state)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
    _validate(q, k, v, slopes, initial_state, segment_ids, block_size)
    impl = resolve_impl(impl)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    slopes = jax.lax.stop_gradient(slopes.astype(jnp.float32))
    if initial_state is None:
        initial_state = jnp.zeros((b, h, dk, dv), jnp.float32)
    initial_state = initial_state.astype(jnp.float32)
    if t == 0:
        return jnp.zeros((b, 0, h, dv), q.dtype), initial_state
    if impl == "reference":
        o, state = lightning_reference(q, k, v, slopes, initial_state, segment_ids)
    elif impl == "xla":
        o, state = lightning_chunked(q, k, v, slopes, initial_state, segment_ids, block_size)
    elif targeting_gpu():
        # Imported on first use, as the TPU kernels below: the XLA paths never load Pallas.
        from pallas_kernels.lightning.pallas_gpu import lightning_pallas_gpu

        o, state = lightning_pallas_gpu(q, k, v, slopes, initial_state, segment_ids, block_size, interpret=False)
    else:
        # Imported on first use: loading Pallas' TPU modules costs ~0.4 s that the XLA paths never need.
        from pallas_kernels.lightning.pallas_tpu import lightning_pallas

        o, state = lightning_pallas(
            q,
            k,
            v,
            slopes,
            initial_state,
            segment_ids,
            block_size,
            interpret=not targeting_tpu(),
        )
    return o.astype(q.dtype), state
