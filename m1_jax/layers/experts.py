"""The routed SwiGLU experts of the MoE layer on one shard: a dense reference and grouped matmuls.

Expert ``e``: ``W2_e(SiLU(W1_e x) * W3_e x)``. Every token goes to ``k`` experts (its ``k`` slots) with a
router weight each; its output is the weighted sum of those experts' outputs. Shapes: x [N, D],
weights / experts [N, k], w1 / w3 [E, D, I], w2 [E, I, D] -> [N, D].

The grouped path sorts the (token, slot) rows by expert, runs each expert on its contiguous run of rows
and scatters the weighted results back to their tokens. The expert-parallel path
(:mod:`m1_jax.layers.moe_parallel`) uses the same three steps with an exchange of the sorted rows
between expert shards in the middle, and :func:`experts_grouped` itself when there is one shard.

The grouped matmul has two exact forms (:data:`GROUPED`), chosen per backend by :func:`grouped_impl`:
``"ragged"`` (``jax.lax.ragged_dot``: XLA's grouped matmul, native on TPU) and ``"chunked"``
(:mod:`m1_jax.layers.expert_chunks`: a loop over each expert's rows in fixed-size chunks, 7-25x faster
than ``ragged_dot`` on CPU, see there).

int8 weights (:mod:`m1_jax.quant`): every function takes ``scales=(s1, s3, s2)``, the float32 per-output-channel
scales of int8 ``w1``, ``w3`` [E, D, I] (scales [E, I]) and ``w2`` [E, I, D] (scales [E, D]). The int8 values
go into the matmul as they are (converted to the compute dtype as they are read, which XLA fuses into the
matmul on TPU) and the scale multiplies the matmul's float32 output: exact, because a per-output-channel
scale is constant along the contraction, and no dequantized copy of an expert's weights is ever made.
Qwix (used for the attention projections, :func:`m1_jax.layers.common.matmul`) is not used here: it
quantizes by intercepting ``dot_general`` / ``einsum``, and the grouped matmuls are ``ragged_dot`` or the
chunked loop, which it does not cover; the output scaling is done here instead (per row of the grouped
matmul: its expert's scales).

LoRA (:mod:`m1_jax.lora`): every function takes ``lora=(adapters, alpha / rank)``, ``adapters`` one entry per
weight (w1, w3, w2): None or the per-expert ``(A [E, in, r], B [E, r, out])``; each projection then adds
``(x @ A_e) @ B_e * alpha / rank`` for its row's expert ``e``, in the same grouped form as the weight's own
matmul (``ragged_dot`` of the rows with ``A`` then ``B``; the chunked loop inside its chunks, its backward
pass giving the adapters' gradients; gathered and dense the same way). Qwix's LoRA does not cover these
matmuls either (it intercepts ``dot_general`` / ``einsum``): written here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m1_jax.layers.expert_chunks import swiglu_chunked
from pallas_kernels.platform import targeting_tpu

# The forms of the grouped expert matmul.
GROUPED = ("ragged", "chunked")


def grouped_impl() -> str:
    """The grouped matmul for the backend being traced for: ``"ragged"`` on TPU (XLA's native grouped
    matmul), ``"chunked"`` elsewhere (``ragged_dot`` has no fast CPU or GPU lowering)."""
    return "ragged" if targeting_tpu() else "chunked"


Scales = tuple[jax.Array, jax.Array, jax.Array]  # per-output-channel scales of int8 (w1, w3, w2)
# LoRA of (w1, w3, w2): each None or (A [E, in, r], B [E, r, out]); and alpha / rank (module docstring)
ExpertLora = tuple[tuple, float]


def _adapters(lora: ExpertLora | None) -> tuple[tuple, float]:
    return ((None, None, None), 1.0) if lora is None else lora


def _plus_lora(y: jax.Array, ab, s: float, low_rank) -> jax.Array:
    """``y`` plus ``low_rank(A, B) * s`` when the weight has an adapter ``ab = (A, B)``."""
    return y if ab is None else y + (low_rank(*ab).astype(jnp.float32) * s).astype(y.dtype)


def scaled(y: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
    """A matmul's output ``y`` times its per-output-channel ``scale`` (broadcast to ``y``) in float32, in
    ``dtype``; ``y`` as it is without a scale."""
    return y if scale is None else (y.astype(jnp.float32) * scale).astype(dtype)


def _acc(scale) -> dict:
    """A quantized matmul accumulates in float32 before it is scaled."""
    return {} if scale is None else {"preferred_element_type": jnp.float32}


def experts_dense(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array,
                  w2: jax.Array, dtype, scales: Scales | None = None, lora: ExpertLora | None = None) -> jax.Array:
    """All experts on all tokens, weighted by the (mostly zero) combine weights: the reference, cost
    ``num_experts / k`` times the useful work."""
    E = w1.shape[0]
    s1, s3, s2 = (None,) * 3 if scales is None else (s[:, None] for s in scales)  # [E, 1, out]
    (l1, l3, l2), ls = _adapters(lora)
    combine_w = jnp.sum(jax.nn.one_hot(experts, E, dtype=dtype) * weights[..., None].astype(dtype), axis=-2)
    x = x.astype(dtype)
    low = lambda a, x1: lambda A, B: jnp.einsum(a[1], jnp.einsum(a[0], x1, A.astype(dtype)), B.astype(dtype))
    mm = lambda spec, a, w, s: scaled(jnp.einsum(spec, a, w.astype(dtype), **_acc(s)), s, dtype)
    p_in = ("nd,edr->enr", "enr,eri->eni")
    h = (jax.nn.silu(_plus_lora(mm("nd,edi->eni", x, w1, s1), l1, ls, low(p_in, x)))
         * _plus_lora(mm("nd,edi->eni", x, w3, s3), l3, ls, low(p_in, x)))
    y = _plus_lora(mm("eni,eid->end", h, w2, s2), l2, ls, low(("eni,eir->enr", "enr,erd->end"), h))
    return jnp.einsum("end,ne->nd", y, combine_w)


def sort_by_expert(x: jax.Array, experts: jax.Array, num_experts: int,
                   dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The (token, slot) rows in expert order: (rows [N*k, D] in ``dtype``, rows per expert int32
    [num_experts], order [N*k]: the flat (token, slot) index of each row)."""
    k = experts.shape[-1]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return x.astype(dtype)[order // k], counts, order


def swiglu_grouped(rows: jax.Array, group_sizes: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                   dtype, impl: str = "ragged", chunk: int | None = None, scales: Scales | None = None,
                   lora: ExpertLora | None = None) -> jax.Array:
    """Expert ``e`` on the ``e``-th run of ``rows`` (runs of ``group_sizes`` rows, in expert order);
    ``impl`` one of :data:`GROUPED`; ``chunk``: rows per chunk of ``"chunked"`` (default: from the
    average run, :func:`m1_jax.layers.expert_chunks.chunk_rows`); ``scales``: of int8 weights, ``lora``: the
    experts' adapters (module docstring)."""
    if impl == "chunked":
        if scales is not None:  # int8 weights go in as they are; each expert's matmuls scale their outputs
            return swiglu_chunked(rows.astype(dtype), group_sizes, w1, w3, w2, chunk, scales=scales, lora=lora)
        return swiglu_chunked(rows.astype(dtype), group_sizes, w1.astype(dtype), w3.astype(dtype), w2.astype(dtype),
                              chunk, lora=lora)
    if impl != "ragged":
        raise ValueError(f"grouped matmul impl must be one of {GROUPED}, got {impl!r}")
    (l1, l3, l2), ls = _adapters(lora)
    low = lambda a: lambda A, B: jax.lax.ragged_dot(jax.lax.ragged_dot(a, A.astype(dtype), group_sizes),
                                                    B.astype(dtype), group_sizes)
    if scales is None:
        h = (jax.nn.silu(_plus_lora(jax.lax.ragged_dot(rows, w1.astype(dtype), group_sizes), l1, ls, low(rows)))
             * _plus_lora(jax.lax.ragged_dot(rows, w3.astype(dtype), group_sizes), l3, ls, low(rows)))
        return _plus_lora(jax.lax.ragged_dot(h, w2.astype(dtype), group_sizes), l2, ls, low(h))
    # Each row's scales are its expert's: a ragged_dot of ones [M, 1] with the scales [E, 1, out] picks them
    # (exactly: one product 1 * s per entry; rows past the runs get 0, as their outputs do).
    ones = jnp.ones((rows.shape[0], 1), jnp.float32)
    row_scales = [jax.lax.ragged_dot(ones, s[:, None].astype(jnp.float32), group_sizes) for s in scales]
    # int8 operands straight into ragged_dot (mixed bf16 x int8 inputs): the conversion is the matmul's own
    mm = lambda a, w, s: scaled(jax.lax.ragged_dot(a, w, group_sizes, preferred_element_type=jnp.float32), s, dtype)
    h = (jax.nn.silu(_plus_lora(mm(rows, w1, row_scales[0]), l1, ls, low(rows)))
         * _plus_lora(mm(rows, w3, row_scales[1]), l3, ls, low(rows)))
    return _plus_lora(mm(h, w2, row_scales[2]), l2, ls, low(h))


def combine(y: jax.Array, weights: jax.Array, order: jax.Array, dtype) -> jax.Array:
    """Expert outputs ``y`` [N*k, D] in the order of :func:`sort_by_expert` -> [N, D]: each row times its
    slot's router weight, added into its token."""
    n, k = weights.shape
    y = y * weights.reshape(-1)[order][:, None].astype(dtype)
    return jnp.zeros((n, y.shape[-1]), dtype).at[order // k].add(y)


def experts_gathered(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array,
                     w2: jax.Array, dtype, scales: Scales | None = None, lora: ExpertLora | None = None) -> jax.Array:
    """Each (token, slot) row with its own expert's weights gathered: reads ``N * k`` expert matrices
    instead of all of them, the cheap form when there are fewer rows than experts (decoding a few rows)."""
    n, k = experts.shape
    rows = jnp.repeat(x.astype(dtype), k, axis=0)  # [n * k, D], row r = token r // k, slot r % k
    e = experts.reshape(-1)
    s1, s3, s2 = (None,) * 3 if scales is None else (s[e] for s in scales)  # [n * k, out]
    (l1, l3, l2), ls = _adapters(lora)
    mm = lambda a, w, s: scaled(jnp.einsum("md,mdi->mi", a, w[e].astype(dtype), **_acc(s)), s, dtype)
    low = lambda a: lambda A, B: jnp.einsum("mr,mri->mi", jnp.einsum("md,mdr->mr", a, A[e].astype(dtype)),
                                            B[e].astype(dtype))
    h = jax.nn.silu(_plus_lora(mm(rows, w1, s1), l1, ls, low(rows))) * _plus_lora(mm(rows, w3, s3), l3, ls, low(rows))
    y = _plus_lora(mm(h, w2, s2), l2, ls, low(h))
    return jnp.einsum("nkd,nk->nd", y.reshape(n, k, -1), weights.astype(dtype))


def experts_grouped(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array,
                    w2: jax.Array, dtype, impl: str = "ragged", scales: Scales | None = None,
                    lora: ExpertLora | None = None) -> jax.Array:
    """Token-sorted grouped matmuls (``impl``, one of :data:`GROUPED`) over all of ``w1.shape[0]`` experts
    (one shard). ``"chunked"`` with fewer (token, slot) rows than experts gathers each row's expert
    instead (:func:`experts_gathered`): on CPU, where a matmul operand sliced out of a larger array is
    copied first, that copies only the experts in use (one decode step of a 143M-parameter model, 1 row,
    8 experts of 512 x 1024: 164 ms before, 39 ms with it, on a 2-core AMD EPYC)."""
    if impl == "chunked" and experts.size < w1.shape[0]:
        return experts_gathered(x, weights, experts, w1, w3, w2, dtype, scales, lora)
    rows, counts, order = sort_by_expert(x, experts, w1.shape[0], dtype)
    return combine(swiglu_grouped(rows, counts, w1, w3, w2, dtype, impl, scales=scales, lora=lora), weights, order,
                   dtype)
