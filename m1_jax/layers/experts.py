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


def scaled(y: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
    """A matmul's output ``y`` times its per-output-channel ``scale`` (broadcast to ``y``) in float32, in
    ``dtype``; ``y`` as it is without a scale."""
    return y if scale is None else (y.astype(jnp.float32) * scale).astype(dtype)


def _acc(scale) -> dict:
    """A quantized matmul accumulates in float32 before it is scaled."""
    return {} if scale is None else {"preferred_element_type": jnp.float32}


def experts_dense(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array,
                  w2: jax.Array, dtype, scales: Scales | None = None) -> jax.Array:
    """All experts on all tokens, weighted by the (mostly zero) combine weights: the reference, cost
    ``num_experts / k`` times the useful work."""
    E = w1.shape[0]
    s1, s3, s2 = (None,) * 3 if scales is None else (s[:, None] for s in scales)  # [E, 1, out]
    combine_w = jnp.sum(jax.nn.one_hot(experts, E, dtype=dtype) * weights[..., None].astype(dtype), axis=-2)
    x = x.astype(dtype)
    mm = lambda spec, a, w, s: scaled(jnp.einsum(spec, a, w.astype(dtype), **_acc(s)), s, dtype)
    h = jax.nn.silu(mm("nd,edi->eni", x, w1, s1)) * mm("nd,edi->eni", x, w3, s3)
    y = mm("eni,eid->end", h, w2, s2)
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
                   dtype, impl: str = "ragged", chunk: int | None = None, scales: Scales | None = None) -> jax.Array:
    """Expert ``e`` on the ``e``-th run of ``rows`` (runs of ``group_sizes`` rows, in expert order);
    ``impl`` one of :data:`GROUPED`; ``chunk``: rows per chunk of ``"chunked"`` (default: from the
    average run, :func:`m1_jax.layers.expert_chunks.chunk_rows`); ``scales``: of int8 weights (module
    docstring)."""
    if impl == "chunked":
        if scales is not None:  # int8 weights go in as they are; each expert's matmuls scale their outputs
            return swiglu_chunked(rows.astype(dtype), group_sizes, w1, w3, w2, chunk, scales=scales)
        return swiglu_chunked(rows.astype(dtype), group_sizes, w1.astype(dtype), w3.astype(dtype), w2.astype(dtype),
                              chunk)
    if impl != "ragged":
        raise ValueError(f"grouped matmul impl must be one of {GROUPED}, got {impl!r}")
    if scales is None:
        h = jax.nn.silu(jax.lax.ragged_dot(rows, w1.astype(dtype), group_sizes)) * jax.lax.ragged_dot(
            rows, w3.astype(dtype), group_sizes)
        return jax.lax.ragged_dot(h, w2.astype(dtype), group_sizes)
    # Each row's scales are its expert's: a ragged_dot of ones [M, 1] with the scales [E, 1, out] picks them
    # (exactly: one product 1 * s per entry; rows past the runs get 0, as their outputs do).
    ones = jnp.ones((rows.shape[0], 1), jnp.float32)
    row_scales = [jax.lax.ragged_dot(ones, s[:, None].astype(jnp.float32), group_sizes) for s in scales]
    # int8 operands straight into ragged_dot (mixed bf16 x int8 inputs): the conversion is the matmul's own
    mm = lambda a, w, s: scaled(jax.lax.ragged_dot(a, w, group_sizes, preferred_element_type=jnp.float32), s, dtype)
    h = jax.nn.silu(mm(rows, w1, row_scales[0])) * mm(rows, w3, row_scales[1])
    return mm(h, w2, row_scales[2])


def combine(y: jax.Array, weights: jax.Array, order: jax.Array, dtype) -> jax.Array:
    """Expert outputs ``y`` [N*k, D] in the order of :func:`sort_by_expert` -> [N, D]: each row times its
    slot's router weight, added into its token."""
    n, k = weights.shape
    y = y * weights.reshape(-1)[order][:, None].astype(dtype)
    return jnp.zeros((n, y.shape[-1]), dtype).at[order // k].add(y)


def experts_gathered(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array,
                     w2: jax.Array, dtype, scales: Scales | None = None) -> jax.Array:
    """Each (token, slot) row with its own expert's weights gathered: reads ``N * k`` expert matrices
    instead of all of them, the cheap form when there are fewer rows than experts (decoding a few rows)."""
    n, k = experts.shape
    rows = jnp.repeat(x.astype(dtype), k, axis=0)  # [n * k, D], row r = token r // k, slot r % k
    e = experts.reshape(-1)
    s1, s3, s2 = (None,) * 3 if scales is None else (s[e] for s in scales)  # [n * k, out]
    mm = lambda a, w, s: scaled(jnp.einsum("md,mdi->mi", a, w[e].astype(dtype), **_acc(s)), s, dtype)
    y = mm(jax.nn.silu(mm(rows, w1, s1)) * mm(rows, w3, s3), w2, s2)
    return jnp.einsum("nkd,nk->nd", y.reshape(n, k, -1), weights.astype(dtype))


def experts_grouped(x: jax.Array, weights: jax.Array, experts: jax.Array, w1: jax.Array, w3: jax.Array,
                    w2: jax.Array, dtype, impl: str = "ragged", scales: Scales | None = None) -> jax.Array:
    """Token-sorted grouped matmuls (``impl``, one of :data:`GROUPED`) over all of ``w1.shape[0]`` experts
    (one shard). ``"chunked"`` with fewer (token, slot) rows than experts gathers each row's expert
    instead (:func:`experts_gathered`): on CPU, where a matmul operand sliced out of a larger array is
    copied first, that copies only the experts in use (one decode step of a 143M-parameter model, 1 row,
    8 experts of 512 x 1024: 164 ms before, 39 ms with it, on a 2-core AMD EPYC)."""
    if impl == "chunked" and experts.size < w1.shape[0]:
        return experts_gathered(x, weights, experts, w1, w3, w2, dtype, scales)
    rows, counts, order = sort_by_expert(x, experts, w1.shape[0], dtype)
    return combine(swiglu_grouped(rows, counts, w1, w3, w2, dtype, impl, scales=scales), weights, order, dtype)
