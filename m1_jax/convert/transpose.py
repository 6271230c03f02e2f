"""Host-side copies that change layout: the ``[out, in]`` <-> ``[in, out]`` transposes of conversion.

numpy's strided copy moves one element per step, so transposing a bf16 matrix runs at 0.2-1 GB/s on
one core. :func:`transpose_into` moves 16 bytes at a time instead: each row is viewed as 16-byte units
(8 bf16 or 4 fp32 values), a tile of units is transposed, and the values packed in each unit are
then spread over their output rows while the tile is still in cache. On a 2-core EPYC this runs at
1.8-3.5 GB/s per thread for bf16 (``tools/bench_convert.py`` shows it in use); it is a plain copy, so
the result is bit-identical to ``np.ascontiguousarray(a.T)``. numpy releases the GIL inside each copy,
so threads transposing different tensors run in parallel.
"""

from __future__ import annotations

import numpy as np

UNIT = np.dtype(np.complex128)  # a 16-byte element numpy copies in one move
TILE_ROWS, TILE_UNITS = 256, 64  # source rows x 16-byte units per tile (256 KiB): fits in L2
_PLAIN_TILE = 256  # tile edge of the element-wise fallback


_UINT = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}


def _as_uint(a: np.ndarray) -> np.ndarray:
    """``a`` viewed as unsigned integers of its item size: numpy's own copy loops instead of a custom
    dtype's (ml_dtypes' bfloat16 copies element by element through its own, slower, functions)."""
    return a.view(_UINT[a.itemsize]) if a.itemsize in _UINT and a.dtype != _UINT[a.itemsize] else a


def _fast_path_ok(a: np.ndarray) -> bool:
    k = UNIT.itemsize // a.itemsize if a.itemsize and UNIT.itemsize % a.itemsize == 0 else 0
    return (a.ndim == 2 and k > 1 and a.shape[1] % k == 0 and a.strides[1] == a.itemsize
            and a.strides[0] % a.itemsize == 0)


def transpose_into(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``out[...] = a.T`` for a 2-D ``a``; ``out`` (C-contiguous, ``a.shape[::-1]``) is allocated if None.

    ``a`` may be any view; when its rows are contiguous (a C-contiguous array or a column slice of one,
    as checkpoint tensors are) the copy goes 16 bytes at a time, otherwise tile by tile per element.
    """
    if a.ndim != 2:
        raise ValueError(f"transpose_into: expected a 2-D array, got shape {a.shape}")
    rows, cols = a.shape
    if out is None:
        out = np.empty((cols, rows), a.dtype)
    elif out.shape != (cols, rows) or not out.flags.c_contiguous or out.dtype != a.dtype:
        raise ValueError(f"transpose_into: out must be C-contiguous {a.dtype} of shape {(cols, rows)}, "
                         f"got {out.dtype} {out.shape}")
    if rows == 0 or cols == 0:
        return out
    if a.itemsize in _UINT and a.dtype.kind not in "biu":
        transpose_into(_as_uint(a), _as_uint(out))
        return out
    if not _fast_path_ok(a):
        for i in range(0, rows, _PLAIN_TILE):
            for j in range(0, cols, _PLAIN_TILE):
                np.copyto(out[j:j + _PLAIN_TILE, i:i + _PLAIN_TILE], a[i:i + _PLAIN_TILE, j:j + _PLAIN_TILE].T)
        return out
    k = UNIT.itemsize // a.itemsize
    units = a.view(UNIT)  # [rows, cols / k]
    n = cols // k
    grouped = out.reshape(n, k, rows)  # output row u*k + m holds value m of unit column u
    tile = np.empty((TILE_UNITS, TILE_ROWS), UNIT)
    for j0 in range(0, n, TILE_UNITS):
        j1 = min(j0 + TILE_UNITS, n)
        for i0 in range(0, rows, TILE_ROWS):
            i1 = min(i0 + TILE_ROWS, rows)
            t = tile[: j1 - j0, : i1 - i0]
            np.copyto(t, units[i0:i1, j0:j1].T)
            np.copyto(grouped[j0:j1, :, i0:i1], t.view(a.dtype).reshape(j1 - j0, i1 - i0, k).transpose(0, 2, 1))
    return out


def contiguous_into(view: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A C-contiguous copy of ``view`` (written into ``out`` if given, a buffer of the same shape and dtype).

    Views that are transposes of row-contiguous data in their last two axes (a checkpoint tensor's
    ``.T``, or ``.transpose(0, 2, 1)`` of a stack) take :func:`transpose_into`; others a plain copy.
    """
    if out is None:
        if view.flags.c_contiguous:
            return view
        out = np.empty(view.shape, view.dtype)
    if view.ndim >= 2 and view.strides[-2] == view.itemsize and view.shape[-1] > 1 and view.shape[-2] > 1:
        flat_out = out.reshape((-1,) + view.shape[-2:])
        lead = view.reshape((-1,) + view.shape[-2:]) if view.ndim > 2 else view[None]
        for i in range(lead.shape[0]):
            transpose_into(np.swapaxes(lead[i], 0, 1), flat_out[i])
        return out
    np.copyto(out, view)
    return out
