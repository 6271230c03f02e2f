"""SwiGLU experts over runs of expert-sorted rows, one fixed-size chunk of rows at a time (CPU and GPU).

``swiglu_chunked(rows, group_sizes, w1, w3, w2)`` computes what ``jax.lax.ragged_dot`` computes for the
SwiGLU experts: rows sorted by expert, expert ``e`` on its run of ``group_sizes[e]`` rows. For each
expert (a static loop, so its weights are read in place) a ``fori_loop`` walks its run in chunks of
``chunk`` rows: one chunk is two ``[chunk, D] x [D, I]`` matmuls, the SiLU gate and a ``[chunk, I] x
[I, D]`` matmul, while the chunk is hot in cache; rows of the last chunk past the run (they belong to the
next expert, or are padding) are computed and discarded. The work is the useful work plus at most
``chunk - 1`` rows per expert. The backward pass (``jax.custom_vjp``) walks the same chunks: input
gradients chunk by chunk, weight gradients accumulated per expert in float32.

Why: XLA's ``ragged_dot`` has no fast CPU lowering. Measured on a 2-core AMD EPYC (jax 0.10.2, float32,
hidden 512, expert width 1024, top-2), against one batched einsum of the same FLOPs (``[E, n, D] x
[E, D, I]`` with equal groups, the best case):

==========================  ==============  ===================  ============================
tokens, experts              batched einsum  ``ragged_dot``       chunked (chunk 128)
==========================  ==============  ===================  ============================
2,048, 8                     147 GFLOP/s     21 GFLOP/s (0.14x)   140 GFLOP/s (0.95x)
4,096, 8                     149 GFLOP/s     20 GFLOP/s (0.13x)   141 GFLOP/s (0.95x)
4,096, 32                    143 GFLOP/s     5 GFLOP/s (0.03x)    114 GFLOP/s (0.79x)
==========================  ==============  ===================  ============================

The same rows padded per expert to a multiple of the chunk and run as one batched matmul over blocks
with each block's expert weights gathered was 55-92 GFLOP/s (the weight gather costs as much as the
matmuls); running the three projections as three separate chunked matmuls 85-115 GFLOP/s.
``tools/bench_moe.py`` reruns the comparison.

With int8 weights (``scales``, :mod:`m1_jax.quant`) each chunk's matmuls read the expert's int8 values
(converted to the rows' dtype inside the loop, one expert at a time) and multiply their float32 outputs by
the expert's per-output-channel scales; that path is forward only (inference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Rows per chunk: at most this, and no more than the average run (measured: 64-128 best at 256-512 rows
# per expert; small batches, as in decoding, want small chunks).
MAX_CHUNK = 128
MIN_CHUNK = 8


def chunk_rows(num_rows: int, num_experts: int) -> int:
    """Chunk size for ``num_rows`` rows over ``num_experts`` experts: the power of two at or above the
    average run, within [MIN_CHUNK, MAX_CHUNK]."""
    avg = max(num_rows // max(num_experts, 1), 1)
    return int(min(MAX_CHUNK, max(MIN_CHUNK, 1 << (avg - 1).bit_length())))


def _dot(a, b, dims):
    return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


def _padded(a: jax.Array, chunk: int) -> jax.Array:
    """``a`` with ``chunk`` zero rows after it, so the last chunk of the last run stays in bounds."""
    return jnp.concatenate([a, jnp.zeros((chunk,) + a.shape[1:], a.dtype)])


def _zeros(shape, dtype, *like: jax.Array) -> jax.Array:
    """Zeros typed as varying over every mesh axis that one of ``like`` varies over: inside
    ``jax.shard_map`` a loop carry must keep the type the loop body gives it."""
    z = jnp.zeros(shape, dtype)
    for a in like:
        z = z + jnp.zeros_like(a, dtype=dtype, shape=shape)
    return z


def _runs(group_sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
    sizes = group_sizes.astype(jnp.int32)
    return jnp.cumsum(sizes) - sizes, sizes


def _each_chunk(starts, sizes, e: int, chunk: int, body, carry):
    """``body(offset, keep [chunk] bool, carry)`` over the chunks of run ``e``."""
    s, n = starts[e], sizes[e]

    def step(j, c):
        keep = j * chunk + jnp.arange(chunk) < n
        return body(s + j * chunk, keep, c)

    return jax.lax.fori_loop(0, (n + chunk - 1) // chunk, step, carry)


def _slice(a, off, chunk):
    return jax.lax.dynamic_slice_in_dim(a, off, chunk)


def _write(buf, off, keep, new):
    old = _slice(buf, off, new.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(keep[:, None], new.astype(buf.dtype), old), off, 0)


def _forward(rows, group_sizes, w1, w3, w2, chunk, residuals: bool, scales=None):
    """-> (y [M, D], h1 [M, I], h3 [M, I]): outputs and the two input projections (the residuals of the
    backward pass; with ``residuals=False`` not kept: None). ``scales``: (s1, s3, s2) of int8 weights."""
    M, _ = rows.shape
    E, _, I = w1.shape
    starts, sizes = _runs(group_sizes)
    x = _padded(rows, chunk)
    y = _zeros((M + chunk, w2.shape[-1]), rows.dtype, rows, group_sizes, w1, w3, w2)
    h1 = h3 = _zeros((M + chunk, I), rows.dtype, rows, group_sizes, w1, w3) if residuals else None
    for e in range(E):
        a1, a3, a2 = (w[e].astype(rows.dtype) for w in (w1, w3, w2))
        c1, c3, c2 = (1, 1, 1) if scales is None else (s[e].astype(jnp.float32) for s in scales)

        def body(off, keep, c, a1=a1, a3=a3, a2=a2, c1=c1, c3=c3, c2=c2):
            y, h1, h3 = c
            xb = _slice(x, off, chunk)
            p1 = (_dot(xb, a1, ((1,), (0,))) * c1).astype(rows.dtype)
            p3 = (_dot(xb, a3, ((1,), (0,))) * c3).astype(rows.dtype)
            yb = _dot(jax.nn.silu(p1) * p3, a2, ((1,), (0,))) * c2
            if not residuals:
                return _write(y, off, keep, yb), None, None
            return _write(y, off, keep, yb), _write(h1, off, keep, p1), _write(h3, off, keep, p3)

        y, h1, h3 = _each_chunk(starts, sizes, e, chunk, body, (y, h1, h3))
    return (y[:M], h1[:M], h3[:M]) if residuals else (y[:M], None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _swiglu(rows, group_sizes, w1, w3, w2, chunk):
    return _forward(rows, group_sizes, w1, w3, w2, chunk, residuals=False)[0]


def _swiglu_fwd(rows, group_sizes, w1, w3, w2, chunk):
    y, h1, h3 = _forward(rows, group_sizes, w1, w3, w2, chunk, residuals=True)
    return y, (rows, group_sizes, w1, w3, w2, h1, h3)


def _swiglu_bwd(chunk, res, dy):
    rows, group_sizes, w1, w3, w2, h1, h3 = res
    M, D = rows.shape
    E, _, I = w1.shape
    starts, sizes = _runs(group_sizes)
    x, p1, p3, g = (_padded(a, chunk) for a in (rows, h1, h3, dy.astype(rows.dtype)))
    every = (rows, group_sizes, w1, w3, w2, dy)
    dx = _zeros((M + chunk, D), rows.dtype, *every)
    grads = []
    for e in range(E):
        a1, a3, a2 = w1[e], w3[e], w2[e]

        def body(off, keep, c, a1=a1, a3=a3, a2=a2):
            dx, g1, g3, g2 = c
            xb, q1, q3 = _slice(x, off, chunk), _slice(p1, off, chunk), _slice(p3, off, chunk)
            gb = jnp.where(keep[:, None], _slice(g, off, chunk), 0)  # rows outside the run add nothing
            sig = jax.nn.sigmoid(q1)
            act = q1 * sig
            g2 = g2 + _dot(act * q3, gb, ((0,), (0,)))
            dh = _dot(gb, a2, ((1,), (1,))).astype(rows.dtype)
            d3 = dh * act
            d1 = dh * q3 * sig * (1 + q1 * (1 - sig))
            g1 = g1 + _dot(xb, d1, ((0,), (0,)))
            g3 = g3 + _dot(xb, d3, ((0,), (0,)))
            dxb = _dot(d1, a1, ((1,), (1,))) + _dot(d3, a3, ((1,), (1,)))
            return _write(dx, off, keep, dxb), g1, g3, g2

        zeros = (_zeros((D, I), jnp.float32, *every), _zeros((D, I), jnp.float32, *every),
                 _zeros((I, D), jnp.float32, *every))
        dx, *ge = _each_chunk(starts, sizes, e, chunk, body, (dx, *zeros))
        grads.append(ge)
    g1, g3, g2 = (jnp.stack(gs) for gs in zip(*grads))
    return dx[:M], None, g1.astype(w1.dtype), g3.astype(w3.dtype), g2.astype(w2.dtype)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu_chunked(rows: jax.Array, group_sizes: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                   chunk: int | None = None, scales=None) -> jax.Array:
    """Expert ``e`` on the ``e``-th run of ``rows`` [M, D] (runs of ``group_sizes`` int [E] rows, in expert
    order; rows past ``sum(group_sizes)`` get zeros, as with ``ragged_dot``). w1 / w3 [E, D, I],
    w2 [E, I, D], all in ``rows``' dtype -> [M, D]. ``chunk``: rows per chunk (default
    :func:`chunk_rows`). ``scales``: (s1 [E, I], s3 [E, I], s2 [E, D]) float32 of int8 weights (module
    docstring; not differentiable)."""
    chunk = chunk_rows(rows.shape[0], w1.shape[0]) if chunk is None else int(chunk)
    if scales is not None:
        return _forward(rows, group_sizes, w1, w3, w2, chunk, residuals=False, scales=scales)[0]
    # Inside jax.shard_map the custom backward pass must return each gradient with its input's type: give
    # every float input the mesh axes all of them vary over first (a no-op on values; its own derivative
    # sums a weight's gradient over the axes the rows are split on).
    rows, w1, w3, w2 = (_zeros(a.shape, a.dtype, rows, w1, w3, w2) + a for a in (rows, w1, w3, w2))
    return _swiglu(rows, group_sizes, w1, w3, w2, chunk)
