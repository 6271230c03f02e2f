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
the expert's per-output-channel scales; without adapters that path is forward only (inference).

LoRA adapters (``lora``, :mod:`m1_jax.lora`): each chunk's projections add ``(x @ A_e) @ B_e * alpha / rank``;
the backward pass accumulates the adapters' gradients per expert in float32 from the same chunks. With
int8 weights and adapters (QLoRA) the backward pass runs through the int8 values (the input gradient
``(d * s) @ q^T``) and gives the frozen int8 weights no gradient.
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


def _expert(e: int, w1, w3, w2, scales, adapters, dtype):
    """Expert ``e``'s weights in ``dtype`` (int8 values converted as read), their output scales (1 without)
    and its adapters ((A, B) in ``dtype`` or None per weight)."""
    ws = tuple(w[e].astype(dtype) for w in (w1, w3, w2))
    cs = (1, 1, 1) if scales is None else tuple(s[e].astype(jnp.float32) for s in scales)
    ads = tuple(None if ab is None else (ab[0][e].astype(dtype), ab[1][e].astype(dtype)) for ab in adapters)
    return ws, cs, ads


def _proj(xb, w, c, ad, lscale: float, dtype):
    """One chunk's projection in float32: ``(xb @ w) * c`` plus ``(xb @ A) @ B * lscale`` with an adapter."""
    p = _dot(xb, w, ((1,), (0,))) * c
    if ad is not None:
        p = p + _dot(_dot(xb, ad[0], ((1,), (0,))).astype(dtype), ad[1], ((1,), (0,))) * lscale
    return p


def _forward(rows, group_sizes, w1, w3, w2, chunk, residuals: bool, scales=None, adapters=(None,) * 3,
             lscale: float = 1.0):
    """-> (y [M, D], h1 [M, I], h3 [M, I]): outputs and the two input projections (the residuals of the
    backward pass; with ``residuals=False`` not kept: None). ``scales``: (s1, s3, s2) of int8 weights;
    ``adapters``: LoRA (A, B) or None per weight, scaled by ``lscale``."""
    M, _ = rows.shape
    E, _, I = w1.shape
    dt = rows.dtype
    starts, sizes = _runs(group_sizes)
    x = _padded(rows, chunk)
    y = _zeros((M + chunk, w2.shape[-1]), dt, rows, group_sizes, w1, w3, w2)
    h1 = h3 = _zeros((M + chunk, I), dt, rows, group_sizes, w1, w3) if residuals else None
    for e in range(E):
        ws, cs, ads = _expert(e, w1, w3, w2, scales, adapters, dt)

        def body(off, keep, c, ws=ws, cs=cs, ads=ads):
            y, h1, h3 = c
            xb = _slice(x, off, chunk)
            p1 = _proj(xb, ws[0], cs[0], ads[0], lscale, dt).astype(dt)
            p3 = _proj(xb, ws[1], cs[1], ads[1], lscale, dt).astype(dt)
            yb = _proj(jax.nn.silu(p1) * p3, ws[2], cs[2], ads[2], lscale, dt)
            if not residuals:
                return _write(y, off, keep, yb), None, None
            return _write(y, off, keep, yb), _write(h1, off, keep, p1), _write(h3, off, keep, p3)

        y, h1, h3 = _each_chunk(starts, sizes, e, chunk, body, (y, h1, h3))
    return (y[:M], h1[:M], h3[:M]) if residuals else (y[:M], None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _swiglu(rows, group_sizes, w1, w3, w2, scales, adapters, chunk, lscale):
    return _forward(rows, group_sizes, w1, w3, w2, chunk, False, scales, adapters, lscale)[0]


def _swiglu_fwd(rows, group_sizes, w1, w3, w2, scales, adapters, chunk, lscale):
    y, h1, h3 = _forward(rows, group_sizes, w1, w3, w2, chunk, True, scales, adapters, lscale)
    return y, (rows, group_sizes, w1, w3, w2, scales, adapters, h1, h3)


def _low_rank_grads(inp, d, ad, lscale, dt, carry):
    """A projection's adapter in the backward pass: its input ``inp`` [chunk, in], the gradient ``d``
    [chunk, out] of its output -> (gradient of ``inp`` through the adapter, updated (gA, gB) sums)."""
    a, b = ad
    u = _dot(inp, a, ((1,), (0,))).astype(dt)  # [chunk, r]
    gu = (_dot(d, b, ((1,), (1,))) * lscale).astype(dt)  # [chunk, r]
    ga, gb = carry
    ga = ga + _dot(inp, gu, ((0,), (0,)))
    gb = gb + _dot(u, d, ((0,), (0,))) * lscale
    return _dot(gu, a, ((1,), (1,))), (ga, gb)


def _swiglu_bwd(chunk, lscale, res, dy):
    rows, group_sizes, w1, w3, w2, scales, adapters, h1, h3 = res
    M, D = rows.shape
    E, _, I = w1.shape
    dt = rows.dtype
    weight_grads = scales is None  # int8 weights are frozen: no gradient
    starts, sizes = _runs(group_sizes)
    x, p1, p3, g = (_padded(a, chunk) for a in (rows, h1, h3, dy.astype(dt)))
    every = (rows, group_sizes, w1, w3, w2, dy, *jax.tree.leaves(adapters))
    dx = _zeros((M + chunk, D), dt, *every)
    grads, agrads = [], []
    for e in range(E):
        ws, cs, ads = _expert(e, w1, w3, w2, scales, adapters, dt)

        def body(off, keep, c, ws=ws, cs=cs, ads=ads):
            dx, wg, lg = c
            xb, q1, q3 = _slice(x, off, chunk), _slice(p1, off, chunk), _slice(p3, off, chunk)
            gb = jnp.where(keep[:, None], _slice(g, off, chunk), 0)  # rows outside the run add nothing
            sig = jax.nn.sigmoid(q1)
            act = q1 * sig
            h = act * q3
            lg = list(lg)
            dh = _dot((gb * cs[2]).astype(dt), ws[2], ((1,), (1,)))
            if ads[2] is not None:
                dh_l, lg[2] = _low_rank_grads(h, gb, ads[2], lscale, dt, lg[2])
                dh = dh + dh_l
            dh = dh.astype(dt)
            d3 = dh * act
            d1 = dh * q3 * sig * (1 + q1 * (1 - sig))
            dxb = _dot((d1 * cs[0]).astype(dt), ws[0], ((1,), (1,))) + _dot((d3 * cs[1]).astype(dt), ws[1], ((1,), (1,)))
            for j, (inp, d) in ((0, (xb, d1)), (1, (xb, d3))):
                if ads[j] is not None:
                    dx_l, lg[j] = _low_rank_grads(inp, d, ads[j], lscale, dt, lg[j])
                    dxb = dxb + dx_l
            if weight_grads:
                g1, g3, g2 = wg
                wg = (g1 + _dot(xb, d1, ((0,), (0,))), g3 + _dot(xb, d3, ((0,), (0,))), g2 + _dot(h, gb, ((0,), (0,))))
            return _write(dx, off, keep, dxb), wg, tuple(lg)

        wz = ((_zeros((D, I), jnp.float32, *every), _zeros((D, I), jnp.float32, *every),
               _zeros((I, D), jnp.float32, *every)) if weight_grads else None)
        lz = tuple(None if ad is None else (_zeros(ad[0].shape, jnp.float32, *every), _zeros(ad[1].shape, jnp.float32,
                                                                                                 *every))
                   for ad in ads)
        dx, wg, lg = _each_chunk(starts, sizes, e, chunk, body, (dx, wz, lz))
        grads.append(wg)
        agrads.append(lg)
    if weight_grads:
        g1, g3, g2 = (jnp.stack(gs).astype(w.dtype) for gs, w in zip(zip(*grads), (w1, w3, w2)))
    else:
        g1 = g3 = g2 = None
    ga = tuple(None if ab is None else (jnp.stack([lg[j][0] for lg in agrads]).astype(ab[0].dtype),
                                        jnp.stack([lg[j][1] for lg in agrads]).astype(ab[1].dtype))
               for j, ab in enumerate(adapters))
    return dx[:M], None, g1, g3, g2, None, ga


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu_chunked(rows: jax.Array, group_sizes: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                   chunk: int | None = None, scales=None, lora=None) -> jax.Array:
    """Expert ``e`` on the ``e``-th run of ``rows`` [M, D] (runs of ``group_sizes`` int [E] rows, in expert
    order; rows past ``sum(group_sizes)`` get zeros, as with ``ragged_dot``). w1 / w3 [E, D, I],
    w2 [E, I, D], all in ``rows``' dtype -> [M, D]. ``chunk``: rows per chunk (default
    :func:`chunk_rows`). ``scales``: (s1 [E, I], s3 [E, I], s2 [E, D]) float32 of int8 weights (module
    docstring; the int8 weights get no gradient). ``lora``: (adapters, alpha / rank), adapters None or
    (A [E, in, r], B [E, r, out]) per weight (:mod:`m1_jax.layers.experts`): added inside each chunk's
    projections, with their gradients from the same chunks in the backward pass."""
    chunk = chunk_rows(rows.shape[0], w1.shape[0]) if chunk is None else int(chunk)
    adapters, lscale = ((None,) * 3, 1.0) if lora is None else lora
    adapters = tuple(adapters)
    if scales is not None and lora is None:  # inference on int8 weights: forward only
        return _forward(rows, group_sizes, w1, w3, w2, chunk, residuals=False, scales=scales)[0]
    # Inside jax.shard_map the custom backward pass must return each gradient with its input's type: give
    # every float input the mesh axes all of them vary over first (a no-op on values; its own derivative
    # sums a weight's gradient over the axes the rows are split on). int8 weights get no gradient.
    floats = [rows, *jax.tree.leaves(adapters)] + ([w1, w3, w2] if scales is None else [])
    vary = lambda a: _zeros(a.shape, a.dtype, *floats) + a
    rows = vary(rows)
    if scales is None:
        w1, w3, w2 = vary(w1), vary(w3), vary(w2)
    adapters = jax.tree.map(vary, adapters)
    return _swiglu(rows, group_sizes, w1, w3, w2, scales, adapters, chunk, float(lscale))
