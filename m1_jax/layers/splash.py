"""Causal GQA softmax attention through JAX's Pallas TPU splash-attention kernel.

The kernel (``jax.experimental.pallas.ops.tpu.splash_attention``) is used for the full-sequence
forward of :class:`m1_jax.layers.attention.SoftmaxAttention` when tracing for TPU: on a TPU backend or
inside :func:`pallas_kernels.platform.tpu_target` (ahead-of-time compiles from a CPU host, ``m1 aot``),
the same switch the lightning op uses. It computes ``softmax(q k^T / sqrt(head_dim))`` with a float32
running max / sum / accumulator under a causal mask, optionally restricted to equal segment ids; query
head ``h`` reads KV head ``h // (heads / kv_heads)``. The kernel takes no scale, so ``q`` is scaled
first (in float32, then cast back to its dtype).

Shape constraints: the sequence must be a multiple of 128 (the kernel's smallest block) and
``head_dim`` a multiple of 128 (TPU lanes). :func:`unsupported_reason` names the one that fails; the
caller then uses the XLA path (and logs why).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp

from m1_jax import sharding

log = logging.getLogger(__name__)

LANES = 128
BLOCKS = (512, 256, 128)  # tried largest first; the sequence must be a multiple of one


def block_size(seq_len: int) -> int | None:
    """The largest supported kernel block dividing ``seq_len`` (None when none does)."""
    return next((b for b in BLOCKS if seq_len % b == 0), None)


def unsupported_reason(q_shape, k_shape) -> str | None:
    """Why the splash kernel cannot take q [B, T, H, d] / k [B, T, KV, d] (None when it can)."""
    _, T, H, d = q_shape
    Tk, KV = k_shape[1], k_shape[2]
    if Tk != T:
        return f"query length {T} != key length {Tk}"
    if block_size(T) is None:
        return f"sequence length {T} is not a multiple of {min(BLOCKS)}"
    if d % LANES:
        return f"head_dim {d} is not a multiple of {LANES}"
    if H % KV:
        return f"heads {H} is not a multiple of kv_heads {KV}"
    return None


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, seq_len: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len)) for _ in range(heads)])
    blocks = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                           block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                           block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local_splash(q, k, v, segment_ids, *, interpret: bool):
    """Per-device body: q [B, T, H, d], k/v [B, T, KV, d], segment_ids [B, T] or None."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    B, T, H, d = q.shape
    kernel = _kernel(H, T, block_size(T), interpret)
    q = (q.astype(jnp.float32) * (1.0 / math.sqrt(d))).astype(q.dtype)
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, heads, T, d]
    if segment_ids is None:
        o = jax.vmap(lambda q, k, v: kernel(q, k, v))(qh, kh, vh)
    else:
        seg = segment_ids.astype(jnp.int32)
        o = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(qh, kh, vh, seg)
    return jnp.swapaxes(o, 1, 2).astype(q.dtype)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
                     interpret: bool = False) -> jax.Array:
    """Causal GQA attention, q [B, T, H, d], k/v [B, T, KV, d] -> [B, T, H, d] (splash kernel).

    ``segment_ids`` [B, T] additionally restricts each token to keys of its own segment. Under an
    active mesh (:func:`m1_jax.sharding.activate`) the kernel runs per (batch, heads) shard in
    ``jax.shard_map``; when the KV heads are replicated while query heads are split, K and V are
    repeated to one head per query head first so every shard holds the KV heads its queries read.
    ``interpret=True`` runs the kernel in Pallas interpret mode (any backend; for tests).
    """
    reason = unsupported_reason(q.shape, k.shape)
    if reason is not None:
        raise ValueError(f"splash attention: {reason}")
    op = functools.partial(_local_splash, interpret=interpret)
    mesh = sharding.active_mesh()
    if mesh is None:
        return op(q, k, v, segment_ids)
    H, KV = q.shape[2], k.shape[2]
    qs = sharding.spec(("batch", "length", "heads", "head_dim"), q.shape)
    ks = sharding.spec(("batch", "length", "kv_heads", "head_dim"), k.shape)
    if qs[2] is not None and ks[2] is None and KV != H:
        k, v = (jnp.repeat(x, H // KV, axis=2) for x in (k, v))
        ks = qs
    segs = None if segment_ids is None else sharding.spec(("batch", "length"), segment_ids.shape)
    return jax.shard_map(op, mesh=mesh, in_specs=(qs, ks, ks, segs), out_specs=qs, check_vma=False)(
        q, k, v, segment_ids)


_logged: set[str] = set()


def log_fallback(reason: str) -> None:
    """Logs (once per reason) why a TPU trace used the XLA attention path instead of the kernel."""
    if reason not in _logged:
        _logged.add(reason)
        log.info("softmax attention: XLA path instead of the splash kernel: %s", reason)
