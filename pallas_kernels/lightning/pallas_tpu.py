"""Pallas TPU (Mosaic) kernels for lightning attention, forward and backward.

Grid (batch, head tiles, chunks); the chunk axis is sequential ("arbitrary") and
carries the float32 state [head_tile, d_k, d_v] in VMEM scratch. Per chunk of C
tokens and head (slope s, read from SMEM), with the decay terms of chunk_decays.py
(M, a, g, c from the per-token positions/runs of segments.py):

  forward:   O  = ((Q K^T) * M) V + a * (Q S)        S <- g S + (c * K)^T V
  backward (chunks in reverse, dS = cotangent of the state after the chunk):
             A = (Q K^T) * M,  dP = (dO V^T) * M
             dQ = dP K + a * (dO S_prev^T)
             dK = dP^T Q + c * (V dS^T)
             dV = A^T dO + c * (K dS)
             dS <- g dS + (a * Q)^T dO       (after the last chunk: d_initial_state)

The forward used for differentiation also writes the state entering every chunk
([B, H, chunks, d_k, d_v] float32) for the backward. Only Q K^T runs in the input
dtype (float32 accumulation); everything else is float32 (HIGHEST precision).

Layouts: with d_k and d_v multiples of 128 the kernels read q/k/v/o straight from
[B, T, H*D] (a free reshape) with blocks (C, head_tile*D); otherwise they use a
head-major copy [B, H, T, D] with blocks (head_tile, C, D). Both satisfy the TPU
(8, 128) block rule when C is a multiple of 8 (and of 128 for the position rows).

VMEM per grid step (double-buffered blocks + scratch + C x C temporaries), for
C = 256, head_tile = 1, d_k = d_v = 128, float32 inputs (see `vmem_estimate`):
  forward  ~3.5 MiB  (q, k, v, o blocks 4 x 2 x 128 KiB; s0 / final / saved
                      state blocks 3 x 2 x 64 KiB; position rows/columns; state
                      scratch 64 KiB; ~6 C x C f32 temporaries of 256 KiB)
  backward ~5 MiB    (q, k, v, dO, dq, dk, dv blocks 7 x 2 x 128 KiB; state-in,
                      dS_T, dS_0 blocks; dS scratch; ~8 C x C temporaries)
well under the 16 MiB (v5e) / 32 MiB (v5p, v6e) scoped-VMEM defaults.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.lightning.chunk_decays import chunk_decays, chunk_masks
from pallas_kernels.lightning.segments import block_positions

__all__ = ["lightning_pallas", "vmem_estimate"]

_F32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST
_SQ = pl.Squeezed()


@dataclasses.dataclass(frozen=True)
class _Cfg:
    batch: int
    heads: int
    chunks: int
    block: int
    head_tile: int
    dk: int
    dv: int
    packed: bool
    shared_pos: bool  # positions broadcast over batch (no segment ids)
    in_dtype: str
    interpret: bool


# ----------------------------------------------------------------------------
# in-kernel helpers


def _dot(a, b, dims):
    prec = _HI if (a.dtype == _F32 and b.dtype == _F32) else None
    return jax.lax.dot_general(a, b, (dims, ((), ())), precision=prec, preferred_element_type=_F32)


def _mm(a, b):  # a @ b
    return _dot(a, b, ((1,), (0,)))


def _mm_nt(a, b):  # a @ b^T
    return _dot(a, b, ((1,), (1,)))


def _mm_tn(a, b):  # a^T @ b
    return _dot(a, b, ((0,), (0,)))


def _head(ref, j, cfg, dim):
    if cfg.packed:
        return ref[:, j * dim : (j + 1) * dim]
    return ref[j]


def _set_head(ref, j, cfg, dim, val):
    if cfg.packed:
        ref[:, j * dim : (j + 1) * dim] = val.astype(ref.dtype)
    else:
        ref[j] = val.astype(ref.dtype)


# ----------------------------------------------------------------------------
# kernels


def _carry_in(scr, src):
    """At the first step of the chunk axis, the carried state scratch ``scr`` starts as ``src``."""

    @pl.when(pl.program_id(2) == 0)
    def _():
        scr[...] = src[...]


def _carry_out(dst, scr):
    """At the last step of the chunk axis, the carried state ``scr`` is written to ``dst``."""

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        dst[...] = scr[...]


def _heads(cfg: _Cfg, slopes_ref, pos_refs, q_ref, k_ref):
    """Per head ``j`` of this grid step's head tile: (j, decays (m, a, g, c), q, k) of the chunk."""
    masks = chunk_masks(*(ref[...] for ref in pos_refs))
    hb = pl.program_id(1)
    for j in range(cfg.head_tile):
        decays = chunk_decays(slopes_ref[hb * cfg.head_tile + j], masks)
        yield j, decays, _head(q_ref, j, cfg, cfg.dk), _head(k_ref, j, cfg, cfg.dk)


def _fwd_kernel(
    slopes_ref, q_ref, k_ref, v_ref, s0_ref, pr_ref, rr_ref, pc_ref, rc_ref, o_ref, st_ref, *rest, cfg: _Cfg, save: bool
):
    if save:
        states_ref, s_scr = rest
    else:
        (s_scr,) = rest
    _carry_in(s_scr, s0_ref)
    for j, (m, a, g, c), q, k in _heads(cfg, slopes_ref, (pr_ref, rr_ref, pc_ref, rc_ref), q_ref, k_ref):
        v = _head(v_ref, j, cfg, cfg.dv).astype(_F32)
        s_prev = s_scr[j]
        if save:
            states_ref[j] = s_prev
        scores = _mm_nt(q, k)
        o = _mm(scores * m, v) + a * _mm(q.astype(_F32), s_prev)
        _set_head(o_ref, j, cfg, cfg.dv, o)
        s_scr[j] = g * s_prev + _mm_tn(k.astype(_F32) * c, v)
    _carry_out(st_ref, s_scr)


def _bwd_kernel(
    slopes_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    states_ref,
    dst_ref,
    pr_ref,
    rr_ref,
    pc_ref,
    rc_ref,
    dq_ref,
    dk_ref,
    dv_ref,
    ds0_ref,
    ds_scr,
    *,
    cfg: _Cfg,
):
    _carry_in(ds_scr, dst_ref)  # the chunk axis runs backwards in time: this is the last chunk
    for j, (m, a, g, c), q, k in _heads(cfg, slopes_ref, (pr_ref, rr_ref, pc_ref, rc_ref), q_ref, k_ref):
        qf, kf = q.astype(_F32), k.astype(_F32)
        v = _head(v_ref, j, cfg, cfg.dv).astype(_F32)
        do = _head(do_ref, j, cfg, cfg.dv).astype(_F32)
        s_prev = states_ref[j]
        ds = ds_scr[j]
        att = _mm_nt(q, k) * m
        dp = _mm_nt(do, v) * m
        _set_head(dq_ref, j, cfg, cfg.dk, _mm(dp, kf) + a * _mm_nt(do, s_prev))
        _set_head(dk_ref, j, cfg, cfg.dk, _mm_tn(dp, qf) + c * _mm_nt(v, ds))
        _set_head(dv_ref, j, cfg, cfg.dv, _mm_tn(att, do) + c * _mm(kf, ds))
        ds_scr[j] = g * ds + _mm_tn(qf * a, do)
    _carry_out(ds0_ref, ds_scr)  # after the first chunk in time


# ----------------------------------------------------------------------------
# pallas_call builders


def _specs(cfg: _Cfg, reverse: bool):
    nc = cfg.chunks

    def chunk(c):
        return nc - 1 - c if reverse else c

    def pb(b):
        return 0 if cfg.shared_pos else b

    def tok(dim):
        if cfg.packed:
            return pl.BlockSpec((_SQ, cfg.block, cfg.head_tile * dim), lambda b, h, c, _: (b, chunk(c), h))
        return pl.BlockSpec((_SQ, cfg.head_tile, cfg.block, dim), lambda b, h, c, _: (b, h, chunk(c), 0))

    state = pl.BlockSpec((_SQ, cfg.head_tile, cfg.dk, cfg.dv), lambda b, h, c, _: (b, h, 0, 0))
    saved = pl.BlockSpec((_SQ, cfg.head_tile, _SQ, cfg.dk, cfg.dv), lambda b, h, c, _: (b, h, chunk(c), 0, 0))
    row = pl.BlockSpec((_SQ, _SQ, 1, cfg.block), lambda b, h, c, _: (pb(b), chunk(c), 0, 0))
    col = pl.BlockSpec((_SQ, _SQ, cfg.block, 1), lambda b, h, c, _: (pb(b), chunk(c), 0, 0))
    return tok, state, saved, row, col


def _compiler_params(cfg):
    est = max(vmem_estimate(cfg, backward=False), vmem_estimate(cfg, backward=True))
    limit = None if est < 12 * 2**20 else int(min(2 * est, 100 * 2**20))
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=limit)


def vmem_estimate(cfg: _Cfg, backward: bool) -> int:
    """Rough VMEM bytes of one grid step (double-buffered blocks, scratch, temporaries)."""
    isz = jnp.dtype(cfg.in_dtype).itemsize
    c, ht, dk, dv = cfg.block, cfg.head_tile, cfg.dk, cfg.dv
    tok = ht * c * (dk + dv) * isz  # q/k-like + v-like block
    st = ht * dk * dv * 4
    pos = 2 * (8 * max(c, 128) * 4) + 2 * (c * 128 * 4)  # rows pad to 8 sublanes, cols to 128 lanes
    if backward:
        blocks = 2 * (2 * tok + 2 * ht * c * (dk + dv) * isz) + 2 * 3 * st + 2 * pos
        temps = 8 * c * c * 4
    else:
        blocks = 2 * (tok + ht * c * (dk + dv) * isz) + 2 * 3 * st + 2 * pos
        temps = 6 * c * c * 4
    return blocks + st + temps


def _fwd_call(cfg: _Cfg, slopes, q, k, v, s0, pr, rr, pc, rc, save: bool):
    tok, state, saved, row, col = _specs(cfg, reverse=False)
    b, h, nc, c, dk, dv = cfg.batch, cfg.heads, cfg.chunks, cfg.block, cfg.dk, cfg.dv
    out_shape = [jax.ShapeDtypeStruct(v.shape, q.dtype), jax.ShapeDtypeStruct((b, h, dk, dv), _F32)]
    out_specs = [tok(dv), state]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc, dk, dv), _F32))
        out_specs.append(saved)
    n = b * h * nc
    isz = jnp.dtype(q.dtype).itemsize
    cost = pl.CostEstimate(
        flops=n * (2 * c * c * (dk + dv) + 4 * c * dk * dv),
        transcendentals=n * (c * c + 2 * c + 1),
        bytes_accessed=(q.size + k.size) * isz + 2 * v.size * isz + (2 + (nc if save else 0)) * b * h * dk * dv * 4,
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, h // cfg.head_tile, nc),
        in_specs=[tok(dk), tok(dk), tok(dv), state, row, row, col, col],
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((cfg.head_tile, dk, dv), _F32)],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, save=save),
        out_shape=out_shape,
        grid_spec=grid_spec,
        compiler_params=_compiler_params(cfg),
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="lightning_fwd",
    )(slopes, q, k, v, s0, pr, rr, pc, rc)


def _bwd_call(cfg: _Cfg, slopes, q, k, v, do, states, dst, pr, rr, pc, rc):
    tok, state, saved, row, col = _specs(cfg, reverse=True)
    b, h, nc, c, dk, dv = cfg.batch, cfg.heads, cfg.chunks, cfg.block, cfg.dk, cfg.dv
    n = b * h * nc
    isz = jnp.dtype(q.dtype).itemsize
    cost = pl.CostEstimate(
        flops=n * (2 * c * c * (3 * dk + 2 * dv) + 8 * c * dk * dv),
        transcendentals=n * (c * c + 2 * c + 1),
        bytes_accessed=2 * (q.size + k.size + v.size + do.size) * isz + (nc + 2) * b * h * dk * dv * 4,
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, h // cfg.head_tile, nc),
        in_specs=[tok(dk), tok(dk), tok(dv), tok(dv), saved, state, row, row, col, col],
        out_specs=[tok(dk), tok(dk), tok(dv), state],
        scratch_shapes=[pltpu.VMEM((cfg.head_tile, dk, dv), _F32)],
    )
    return pl.pallas_call(
        functools.partial(_bwd_kernel, cfg=cfg),
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct((b, h, dk, dv), _F32),
        ],
        grid_spec=grid_spec,
        compiler_params=_compiler_params(cfg),
        cost_estimate=cost,
        interpret=cfg.interpret,
        name="lightning_bwd",
    )(slopes, q, k, v, do, states, dst, pr, rr, pc, rc)


# ----------------------------------------------------------------------------
# custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, slopes, q, k, v, s0, pr, rr, pc, rc):
    o, st = _fwd_call(cfg, slopes, q, k, v, s0, pr, rr, pc, rc, save=False)
    return o, st


def _core_fwd(cfg, slopes, q, k, v, s0, pr, rr, pc, rc):
    o, st, states = _fwd_call(cfg, slopes, q, k, v, s0, pr, rr, pc, rc, save=True)
    return (o, st), (slopes, q, k, v, states, pr, rr, pc, rc)


def _core_bwd(cfg, res, cts):
    slopes, q, k, v, states, pr, rr, pc, rc = res
    do, dst = cts
    dq, dk, dv, ds0 = _bwd_call(cfg, slopes, q, k, v, do.astype(v.dtype), states, dst.astype(_F32), pr, rr, pc, rc)
    return (None, dq, dk, dv, ds0, None, None, None, None)


_core.defvjp(_core_fwd, _core_bwd)


def _pick_head_tile(heads: int, requested: int | None) -> int:
    if requested is not None:
        if requested <= 0 or heads % requested:
            raise ValueError(f"head_tile must divide heads={heads}, got {requested}")
        return requested
    return 1


def lightning_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    initial_state: jax.Array,
    segment_ids: jax.Array | None,
    block_size: int,
    *,
    interpret: bool | None = None,
    head_tile: int | None = None,
    layout: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Pallas lightning attention. Shapes and semantics as `lightning_attention`.

    interpret: None picks interpret mode when the default backend is not TPU;
      False forces the Mosaic path (ahead-of-time compilation for a TPU target).
    head_tile: heads per grid step (divides heads; default 1).
    layout: "packed" ([B, T, H*D] blocks, needs D % 128 == 0 on TPU) or
      "headmajor" ([B, H, T, D] blocks); default packed iff d_k, d_v % 128 == 0.
    Returns (o in q's dtype, final_state float32).
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    if layout is None:
        layout = "packed" if (dk % 128 == 0 and dv % 128 == 0) else "headmajor"
    if layout not in ("packed", "headmajor"):
        raise ValueError(f"layout must be 'packed' or 'headmajor', got {layout!r}")
    if not interpret and block_size % 128:
        raise ValueError(f"impl='pallas' on TPU needs block_size to be a multiple of 128, got {block_size}")
    ht = _pick_head_tile(h, head_tile)
    c = block_size
    nc = -(-t // c)
    tp = nc * c
    pos, run = block_positions(segment_ids, t, c)  # [Bm, nc, C] float32
    bm = pos.shape[0]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    q, k, v = (jnp.pad(x.astype(dtype), ((0, 0), (0, tp - t), (0, 0), (0, 0))) for x in (q, k, v))
    if layout == "packed":
        q, k, v = (x.reshape(b, tp, h * x.shape[-1]) for x in (q, k, v))
    else:
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    cfg = _Cfg(
        batch=b,
        heads=h,
        chunks=nc,
        block=c,
        head_tile=ht,
        dk=dk,
        dv=dv,
        packed=layout == "packed",
        shared_pos=bm == 1,
        in_dtype=jnp.dtype(dtype).name,
        interpret=bool(interpret),
    )
    pr, rr = pos[:, :, None, :], run[:, :, None, :]
    pc, rc = pos[..., None], run[..., None]
    o, st = _core(cfg, slopes.astype(_F32), q, k, v, initial_state.astype(_F32), pr, rr, pc, rc)
    if layout == "packed":
        o = o.reshape(b, tp, h, dv)
    else:
        o = o.transpose(0, 2, 1, 3)
    return o[:, :t], st
