"""Pallas GPU kernels for lightning attention: forward, backward (custom_vjp) and the decode step.

Backend: Pallas' Triton backend, selected by passing ``pallas.triton.CompilerParams`` (since JAX 0.10 a
plain Pallas GPU call lowers to Mosaic GPU). JAX 0.11 deprecates the Triton backend in favour of Mosaic
GPU; it is still the one used here because

* the kernel stays array code with the TPU kernel's maths: the chunk decays are the same functions
  (chunk_decays.py), and Triton chooses the tensor-core instructions (wgmma on Hopper), the register
  layouts and the software pipelining of the chunk loop (``num_stages``) by itself. A Mosaic GPU kernel
  spells these out (warpgroups, TMA copies and barriers, swizzled shared-memory layouts): a second,
  Hopper-specific program rather than the same maths;
* the same kernel runs in Pallas interpret mode on CPU (the tests) and lowers to Triton IR on a CPU host
  (``pallas_kernels.platform.gpu_target()``), so everything short of the PTX compile is checked without
  a GPU.
The way off the deprecated backend, once JAX removes it, is a port of `_scan_kernel` to ``plgpu.kernel``.

One scan kernel, four passes. `_scan_kernel` walks the chunks of one (batch row, head, tile of state
columns) forwards or backwards in time, carrying a float32 state S [d_x, tile] in registers:

  forward:  O = ((X Y^T) * M) Z + a * (X S)        S <- g S + (c * Y)^T Z
  reverse:  O = ((X Y^T) * M^T) Z + c * (X S)      S <- g S + (a * Y)^T Z

(M, a, g, c of chunk_decays.py.) The attention is the forward scan of (Q, K, V) from S_0. For the
cotangents dO of the output and dS of the final state, its gradients are three more scans:

  dQ = forward scan of (dO, V, K) from S_0^T   (the state is S^T, rebuilt chunk by chunk)
  dV = reverse scan of (K, Q, dO) from dS      (its final state is the gradient of S_0)
  dK = reverse scan of (V, dO, Q) from dS^T

so the backward keeps no per-chunk states (the residuals are q, k, v and S_0) and every pass reads three
[B, T, H, D] tensors and writes one. Each program owns one (batch row, head, tile): grid
(tiles, heads, batch), tiles first so the programs sharing a head's X and Y run side by side (L2).

The forward has a second form, ``forward="split"`` (flash-linear-attention's chunked forward), two kernels:

* state pass (`_state_kernel`): walks the chunks of one (batch row, head, key tile, value tile) with the
  state update alone and saves the state entering every window of ``out_chunks`` chunks (default 1), as
  [B, H, windows, d_k, d_v] in the matmul dtype (the rounding the state gets as an operand of X S anyway),
  and the final state in float32. It reads K and V only, and a tile of the state needs only its rows of K
  and its columns of V, so the state is tiled both ways: grid (value tiles, key tiles, heads, batch);
* output pass (`_out_kernel`): every (batch row, head, window, output tile) computes its outputs from the
  saved state, in parallel: for one chunk per window the scan's output formula alone; for more, the scan
  over the window's chunks, the state carried in float32 from the saved one.

With one chunk per window it does what the forward scan does, operation for operation (interpret mode
gives identical results); with more, the state inside a window starts from the saved, rounded one (with
bf16 inputs a bf16-sized difference). The saved states hold B*H*(T/(C*out_chunks))*d_k*d_v elements: at
64k tokens, 64 heads of 128, chunk 64 and bf16, 2 GiB (twice q), written once and read once. What the
split buys is parallelism: the forward scan is B*H*d_v/tile programs (256 at batch 1, 64 heads, tile 32),
each walking every chunk in sequence; the output pass is B*H*windows*d_v/out_tile short independent
programs (65,536 at 64k tokens), and what stays sequential, the state pass, does one matmul per chunk.

The default forward is the scan: it is the measured one (docs/benchmarks.md, on an H200 at 64k tokens:
forward 1.22x of flash-linear-attention's time, forward+backward 0.82x); the split forward has not been
timed on a GPU yet (tools/gpu_lightning_check.sh times both). The backward is the same for both (its
residuals are q, k, v and S_0, not the saved states).

Precision: with float32 inputs every matmul is float32 (``Precision.HIGHEST``, IEEE on Triton). With
bf16 / f16 inputs the matmul operands are in the input dtype with float32 accumulation, as in
flash-linear-attention: X Y^T, the decayed scores (rounded) times Z, X times the state (rounded to the
input dtype as an operand; the state itself stays float32) and the state update.

Shapes: the chunk is a power of two between 16 and 64 tokens, ``block_size`` rounded down (Triton's tiles
and dots need power-of-two sizes of at least 16); head dims that are not such powers are zero-padded.
Layout: q / k / v are read as [B, T, H*D] (a free reshape of [B, T, H, D]).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.lightning.chunk_decays import chunk_decays, chunk_masks
from pallas_kernels.lightning.segments import block_positions

__all__ = ["DECODE_TILE", "DECODE_WARPS", "FORWARDS", "MAX_CHUNK", "OUT_TILE", "STATE_KEY_TILE", "VALUE_TILE",
           "decode_step_pallas_gpu", "gpu_chunk", "lightning_pallas_gpu"]

_F32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST
_SQ = pl.Squeezed()

# Defaults, the fastest measured on an NVIDIA H200 (docs/benchmarks.md, "Lightning attention on an NVIDIA GPU"):
MAX_CHUNK = 64  # longest chunk: its C x C float32 scores live in registers (chunk 128 and 32 were slower)
VALUE_TILE = 32  # state columns per program of the chunk scans (64: +8% forward time at 64k tokens)
DECODE_TILE, DECODE_WARPS = 128, 8  # decode step: one head's whole state per program, 8 warps
# The split forward's (not measured on a GPU yet; within the ranges flash-linear-attention's autotuner tries):
STATE_KEY_TILE = 64  # state rows per program of the state pass (its columns: VALUE_TILE)
OUT_TILE = 128  # output columns per program of the output pass (128: q k^T and the decays once per chunk)
FORWARDS = ("scan", "split")


@dataclasses.dataclass(frozen=True)
class _Scan:
    """One scan pass: X, Y [B, T, H*dx], Z [B, T, H*dz], state [B, H, dx, dz]."""

    chunks: int
    chunk: int
    dx: int
    dz: int
    tile: int  # state columns (of Z) per program
    reverse: bool
    shared_pos: bool  # positions broadcast over batch (no segment ids)
    mm_dtype: str  # dtype of the matmul operands
    num_warps: int
    num_stages: int
    interpret: bool


@dataclasses.dataclass(frozen=True)
class _Split:
    """The split forward: Q, K [B, T, H*dk], V [B, T, H*dv], saved states [B, H, windows, dk, dv]."""

    windows: int
    window: int  # chunks per window: per program of the output pass
    chunk: int
    dk: int
    dv: int
    key_tile: int  # state rows per program of the state pass
    value_tile: int  # state columns per program of the state pass
    out_tile: int  # output columns per program of the output pass
    shared_pos: bool
    mm_dtype: str
    num_warps: int
    num_stages: int
    interpret: bool


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """What the custom_vjp needs to build its four scans."""

    chunks: int
    chunk: int
    dk: int
    dv: int
    tile: int | None
    shared_pos: bool
    mm_dtype: str
    num_warps: int
    num_stages: int
    interpret: bool
    forward: str = "scan"
    key_tile: int | None = None
    out_tile: int | None = None
    out_chunks: int = 1

    def scan(self, dx: int, dz: int, reverse: bool) -> _Scan:
        tile = min(dz, self.tile or VALUE_TILE)
        return _Scan(self.chunks, self.chunk, dx, dz, tile, reverse, self.shared_pos, self.mm_dtype,
                     self.num_warps, self.num_stages, self.interpret)

    def split(self) -> _Split:
        return _Split(self.chunks // self.out_chunks, self.out_chunks, self.chunk, self.dk, self.dv,
                      min(self.dk, self.key_tile or STATE_KEY_TILE), min(self.dv, self.tile or VALUE_TILE),
                      min(self.dv, self.out_tile or OUT_TILE), self.shared_pos, self.mm_dtype, self.num_warps,
                      self.num_stages, self.interpret)


def gpu_chunk(block_size: int, max_chunk: int = MAX_CHUNK) -> int:
    """The GPU kernels' chunk for ``block_size``: a power of two in [16, max_chunk], at most block_size
    when block_size >= 16."""
    c = 1 << (min(block_size, max_chunk).bit_length() - 1)
    return max(c, 16)


def _pow2_dim(d: int) -> int:
    """Smallest power of two >= max(d, 16): Triton's dots need power-of-two sizes of at least 16."""
    return max(16, 1 << (d - 1).bit_length())


# ----------------------------------------------------------------------------
# kernels


def _dot(a, b, dims):
    prec = _HI if a.dtype == _F32 else None
    return jax.lax.dot_general(a, b, (dims, ((), ())), precision=prec, preferred_element_type=_F32)


def _rows(n, c_len: int):
    """The rows of chunk n (a Python int or a loop index) of a block of whole chunks."""
    return pl.ds(n * c_len if isinstance(n, int) else pl.multiple_of(n * c_len, c_len), c_len)


def _chunk(s, x, y, z, p, r, state, *, mm, reverse=False, out=True, update=True):
    """One chunk of a scan, the formulas above: (O or None, the next state or None).

    x, y [C, d_x] (x unused without ``out``), z [C, tile]; p, r (C,) positions and runs; state [d_x, tile],
    float32 or already the matmul dtype ``mm`` (the split forward's saved states).
    """
    masks = chunk_masks(p[None, :], r[None, :], p[:, None], r[:, None], reverse=reverse)
    m, a, g, c = chunk_decays(s, masks)
    if reverse:  # the state enters at the chunk's end and leaves at its start
        a, c = c, a
    o = new = None
    if out:
        scores = _dot(x, y, ((1,), (1,))) * m
        o = _dot(scores.astype(mm), z, ((1,), (0,))) + a * _dot(x, state.astype(mm), ((1,), (0,)))
    if update:
        new = g * state + _dot((y.astype(_F32) * c).astype(mm), z, ((0,), (0,)))
    return o, new


def _scan_kernel(slopes_ref, x_ref, y_ref, z_ref, s0_ref, pos_ref, run_ref, o_ref, st_ref, *, cfg: _Scan):
    s = slopes_ref[pl.program_id(1)]
    mm = jnp.dtype(cfg.mm_dtype)
    c_len, nc = cfg.chunk, cfg.chunks

    def step(i, state):
        n = nc - 1 - i if cfg.reverse else i
        rows = _rows(n, c_len)
        o, state = _chunk(s, x_ref[rows, :], y_ref[rows, :], z_ref[rows, :], pos_ref[n, :], run_ref[n, :], state,
                          mm=mm, reverse=cfg.reverse)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return state

    st_ref[...] = jax.lax.fori_loop(0, nc, step, s0_ref[...])


def _scan(cfg: _Scan, slopes, x, y, z, s0, pos, run, out_dtype):
    """One scan pass over packed [B, T, H*D] operands; returns (O [B, T, H*dz], final state)."""
    b, tp, hdx = x.shape
    h = hdx // cfg.dx
    nz = cfg.dz // cfg.tile
    seq_xy = pl.BlockSpec((_SQ, tp, cfg.dx), lambda j, hh, bb: (bb, 0, hh))
    seq_z = pl.BlockSpec((_SQ, tp, cfg.tile), lambda j, hh, bb: (bb, 0, hh * nz + j))
    state = pl.BlockSpec((_SQ, _SQ, cfg.dx, cfg.tile), lambda j, hh, bb: (bb, hh, 0, j))
    pos_spec = pl.BlockSpec((_SQ, cfg.chunks, cfg.chunk), lambda j, hh, bb: (0 if cfg.shared_pos else bb, 0, 0))
    slope_spec = pl.BlockSpec((h,), lambda j, hh, bb: (0,))
    return pl.pallas_call(
        functools.partial(_scan_kernel, cfg=cfg),
        grid=(nz, h, b),
        in_specs=[slope_spec, seq_xy, seq_xy, seq_z, state, pos_spec, pos_spec],
        out_specs=[seq_z, state],
        out_shape=[jax.ShapeDtypeStruct((b, tp, h * cfg.dz), out_dtype),
                   jax.ShapeDtypeStruct((b, h, cfg.dx, cfg.dz), _F32)],
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="lightning_scan_reverse" if cfg.reverse else "lightning_scan",
    )(slopes, x, y, z, s0, pos, run)


def _state_kernel(slopes_ref, k_ref, v_ref, s0_ref, pos_ref, run_ref, states_ref, st_ref, *, cfg: _Split):
    """The split forward's state pass: saves the state entering every window, returns the final state."""
    s = slopes_ref[pl.program_id(2)]
    mm = jnp.dtype(cfg.mm_dtype)
    c_len, w = cfg.chunk, cfg.window

    def chunk(n, state):
        rows = _rows(n, c_len)
        return _chunk(s, None, k_ref[rows, :], v_ref[rows, :], pos_ref[n, :], run_ref[n, :], state, mm=mm,
                      out=False)[1]

    def window(i, state):
        states_ref[i] = state.astype(states_ref.dtype)
        if w == 1:
            return chunk(i, state)
        return jax.lax.fori_loop(0, w, lambda j, st: chunk(i * w + j, st), state)

    st_ref[...] = jax.lax.fori_loop(0, cfg.windows, window, s0_ref[...])


def _out_kernel(slopes_ref, q_ref, k_ref, v_ref, st_ref, pos_ref, run_ref, o_ref, *, cfg: _Split):
    """The split forward's output pass: the outputs of one window of chunks from the state entering it."""
    s = slopes_ref[pl.program_id(2)]
    mm = jnp.dtype(cfg.mm_dtype)
    c_len, w = cfg.chunk, cfg.window

    def chunk(n, state):
        rows = _rows(n, c_len)
        o, new = _chunk(s, q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], pos_ref[n, :], run_ref[n, :], state,
                        mm=mm, update=w > 1)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return new

    if w == 1:  # the saved state, in the matmul dtype, is the operand of Q S as it is
        chunk(0, st_ref[...])
    else:  # the state is carried in float32 from the saved one through the window's chunks
        jax.lax.fori_loop(0, w, chunk, st_ref[...].astype(_F32))


def _split_forward(cfg: _Split, slopes, q, k, v, s0, pos, run, out_dtype):
    """The forward as two passes: (O [B, T, H*dv], final state). The states entering the windows are saved
    ([B, H, windows, dk, dv] in the matmul dtype) by a scan over windows with (batch, head, key tile, value
    tile) in parallel, then every (batch, head, window, output tile) computes its outputs in parallel."""
    b, tp, _ = k.shape
    h = slopes.shape[0]
    nc, c_len = cfg.windows * cfg.window, cfg.chunk
    nk, nz = cfg.dk // cfg.key_tile, cfg.dv // cfg.value_tile
    kt, vt = cfg.key_tile, cfg.value_tile
    params = pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    slope_spec = pl.BlockSpec((h,), lambda *_: (0,))

    def pos_spec(rows, index):
        return pl.BlockSpec((_SQ, rows, c_len), lambda j, i, hh, bb: (0 if cfg.shared_pos else bb, index(i), 0))

    state = pl.BlockSpec((_SQ, _SQ, kt, vt), lambda j, i, hh, bb: (bb, hh, i, j))
    states, final = pl.pallas_call(
        functools.partial(_state_kernel, cfg=cfg),
        grid=(nz, nk, h, b),
        in_specs=[slope_spec,
                  pl.BlockSpec((_SQ, tp, kt), lambda j, i, hh, bb: (bb, 0, hh * nk + i)),
                  pl.BlockSpec((_SQ, tp, vt), lambda j, i, hh, bb: (bb, 0, hh * nz + j)),
                  state, pos_spec(nc, lambda i: 0), pos_spec(nc, lambda i: 0)],
        out_specs=[pl.BlockSpec((_SQ, _SQ, cfg.windows, kt, vt), lambda j, i, hh, bb: (bb, hh, 0, i, j)), state],
        out_shape=[jax.ShapeDtypeStruct((b, h, cfg.windows, cfg.dk, cfg.dv), jnp.dtype(cfg.mm_dtype)),
                   jax.ShapeDtypeStruct((b, h, cfg.dk, cfg.dv), _F32)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="lightning_split_states",
    )(slopes, k, v, s0, pos, run)

    rows, ot = cfg.window * c_len, cfg.out_tile
    no = cfg.dv // ot
    qk = pl.BlockSpec((_SQ, rows, cfg.dk), lambda j, i, hh, bb: (bb, i, hh))
    vo = pl.BlockSpec((_SQ, rows, ot), lambda j, i, hh, bb: (bb, i, hh * no + j))
    o = pl.pallas_call(
        functools.partial(_out_kernel, cfg=cfg),
        grid=(no, cfg.windows, h, b),
        in_specs=[slope_spec, qk, qk, vo,
                  pl.BlockSpec((_SQ, _SQ, _SQ, cfg.dk, ot), lambda j, i, hh, bb: (bb, hh, i, 0, j)),
                  pos_spec(cfg.window, lambda i: i), pos_spec(cfg.window, lambda i: i)],
        out_specs=vo,
        out_shape=jax.ShapeDtypeStruct((b, tp, h * cfg.dv), out_dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name="lightning_split_out",
    )(slopes, q, k, v, states, pos, run)
    return o, final


def _decode_kernel(em1_ref, state_ref, q_ref, k_ref, v_ref, o_ref, new_ref):
    e = em1_ref[pl.program_id(1)]
    s = state_ref[...]  # (d_k, tile) float32
    q, k, v = (ref[...].astype(_F32) for ref in (q_ref, k_ref, v_ref))
    new = s + e * s + k[:, None] * v[None, :]
    new_ref[...] = new
    o_ref[...] = jnp.sum(q[:, None] * new, axis=0).astype(o_ref.dtype)


# ----------------------------------------------------------------------------
# custom_vjp


def _swap(s):
    return jnp.swapaxes(s, -1, -2)


def _forward(cfg: _Cfg, slopes, q, k, v, s0, pos, run):
    if cfg.forward == "split":
        return _split_forward(cfg.split(), slopes, q, k, v, s0, pos, run, q.dtype)
    return _scan(cfg.scan(cfg.dk, cfg.dv, False), slopes, q, k, v, s0, pos, run, q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Cfg, slopes, q, k, v, s0, pos, run):
    return _forward(cfg, slopes, q, k, v, s0, pos, run)


def _attention_fwd(cfg, slopes, q, k, v, s0, pos, run):
    return _forward(cfg, slopes, q, k, v, s0, pos, run), (slopes, q, k, v, s0, pos, run)


def _attention_bwd(cfg, res, cts):
    slopes, q, k, v, s0, pos, run = res
    do, dst = cts
    do, dst = do.astype(q.dtype), dst.astype(_F32)
    dk_, dv_ = cfg.dk, cfg.dv
    dq, _ = _scan(cfg.scan(dv_, dk_, False), slopes, do, v, k, _swap(s0), pos, run, q.dtype)
    dk, _ = _scan(cfg.scan(dv_, dk_, True), slopes, v, do, q, _swap(dst), pos, run, k.dtype)
    dv, ds0 = _scan(cfg.scan(dk_, dv_, True), slopes, k, q, do, dst, pos, run, v.dtype)
    return None, dq, dk, dv, ds0, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------
# entry points


def _check_tile(name: str, tile: int | None) -> None:
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 16 or tile & (tile - 1)):
        raise ValueError(f"{name} must be a power of two >= 16, got {tile!r}")


def _pad_last(x: jax.Array, *sizes: int) -> jax.Array:
    """Zero-pads the trailing len(sizes) dims of x up to sizes (no copy when nothing to pad)."""
    extra = [(0, n - d) for d, n in zip(x.shape[-len(sizes):], sizes)]
    if not any(hi for _, hi in extra):
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - len(sizes)) + extra)


def lightning_pallas_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    initial_state: jax.Array,
    segment_ids: jax.Array | None,
    block_size: int,
    *,
    interpret: bool | None = None,
    chunk: int | None = None,
    value_tile: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    forward: str = "scan",
    key_tile: int | None = None,
    out_tile: int | None = None,
    out_chunks: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Pallas GPU lightning attention. Shapes and semantics as `lightning_attention`.

    interpret: None picks interpret mode when the default backend is not GPU.
    chunk: tokens per chunk (a power of two >= 16); default `gpu_chunk(block_size)`.
    value_tile: state columns per program of the scans and of the split forward's state pass (a power of two
      >= 16, capped at the head dim); default VALUE_TILE.
    num_warps, num_stages: Triton's warps per program and software-pipelining depth of the chunk loop.
    forward: "scan" (default) or "split", the forward pass (see the module docstring); the backward is the
      same for both. Only for "split":
      key_tile: state rows per program of the state pass (a power of two >= 16, capped at the head dim);
        default STATE_KEY_TILE.
      out_tile: output columns per program of the output pass (likewise); default OUT_TILE.
      out_chunks: chunks per program of the output pass (a positive int; default 1): the state is saved
        once per out_chunks chunks.
    Returns (o in q's dtype, final_state float32).
    """
    _check_tile("chunk", chunk)
    _check_tile("value_tile", value_tile)
    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
    if forward != "split" and (key_tile, out_tile, out_chunks) != (None, None, None):
        raise ValueError("key_tile, out_tile and out_chunks apply to forward='split' only, "
                         f"got forward={forward!r}")
    _check_tile("key_tile", key_tile)
    _check_tile("out_tile", out_tile)
    if out_chunks is not None and (isinstance(out_chunks, bool) or not isinstance(out_chunks, int) or out_chunks < 1):
        raise ValueError(f"out_chunks must be a positive int, got {out_chunks!r}")
    w = out_chunks or 1
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    c = chunk or gpu_chunk(block_size)
    nb = -(-t // c)
    nc = -(-nb // w) * w  # whole windows of out_chunks chunks
    tp = nc * c
    dkp, dvp = _pow2_dim(dk), _pow2_dim(dv)
    pos, run = block_positions(segment_ids, t, c)  # [Bm, nb, C] float32
    if nc > nb:  # chunks of padding only: no decay, no contribution (run -1)
        pos = jnp.pad(pos, ((0, 0), (0, nc - nb), (0, 0)))
        run = jnp.pad(run, ((0, 0), (0, nc - nb), (0, 0)), constant_values=-1.0)
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)

    def packed(x, d):
        x = _pad_last(x.astype(dtype), d)
        if tp != t:
            x = jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
        return x.reshape(b, tp, h * d)

    cfg = _Cfg(chunks=nc, chunk=c, dk=dkp, dv=dvp, tile=value_tile, shared_pos=pos.shape[0] == 1,
               mm_dtype=jnp.dtype(dtype).name, num_warps=num_warps, num_stages=num_stages,
               interpret=bool(interpret), forward=forward, key_tile=key_tile, out_tile=out_tile, out_chunks=w)
    s0 = _pad_last(initial_state.astype(_F32), dkp, dvp)
    o, st = _attention(cfg, slopes.astype(_F32), packed(q, dkp), packed(k, dkp), packed(v, dvp), s0, pos, run)
    return o.reshape(b, tp, h, dvp)[:, :t, :, :dv], st[..., :dk, :dv]


def decode_step_pallas_gpu(state: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, slopes: jax.Array, *,
                           interpret: bool | None = None, value_tile: int | None = None,
                           num_warps: int = DECODE_WARPS) -> tuple[jax.Array, jax.Array]:
    """One decode step as a Pallas GPU kernel: S' = exp(-s) S + k^T v (as S + expm1(-s) S), o = q S'.

    state float32 [B, H, d_k, d_v]; q, k [B, H, d_k]; v [B, H, d_v]. The new state is written over the
    state's buffer (input_output_aliases; donate it to avoid a copy). Each program updates
    [d_k, value_tile] of one head's state (default DECODE_TILE columns). Returns (o in q's dtype, new state).
    """
    _check_tile("value_tile", value_tile)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    b, h, dk = q.shape
    dv = v.shape[-1]
    dkp, dvp = (max(1, 1 << (d - 1).bit_length()) for d in (dk, dv))
    tile = min(dvp, value_tile or DECODE_TILE)
    em1 = jnp.expm1(-slopes.astype(_F32))
    state = _pad_last(state.astype(_F32), dkp, dvp)
    q, k, v = _pad_last(q, dkp), _pad_last(k, dkp), _pad_last(v, dvp)
    vec_k = pl.BlockSpec((_SQ, _SQ, dkp), lambda j, hh, bb: (bb, hh, 0))
    vec_v = pl.BlockSpec((_SQ, _SQ, tile), lambda j, hh, bb: (bb, hh, j))
    st = pl.BlockSpec((_SQ, _SQ, dkp, tile), lambda j, hh, bb: (bb, hh, 0, j))
    o, new = pl.pallas_call(
        _decode_kernel,
        grid=(dvp // tile, h, b),
        in_specs=[pl.BlockSpec((h,), lambda j, hh, bb: (0,)), st, vec_k, vec_k, vec_v],
        out_specs=[vec_v, st],
        out_shape=[jax.ShapeDtypeStruct((b, h, dvp), q.dtype), jax.ShapeDtypeStruct(state.shape, _F32)],
        input_output_aliases={1: 1},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=bool(interpret),
        name="lightning_decode",
    )(em1, state, q, k, v)
    return o[..., :dv], new[..., :dk, :dv]
