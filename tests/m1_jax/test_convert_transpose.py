"""The layout copies of conversion are bit-identical to numpy's transposes, for every dtype and view."""

import ml_dtypes
import numpy as np
import pytest

from m1_jax.convert.transpose import contiguous_into, transpose_into

DTYPES = [ml_dtypes.bfloat16, np.float16, np.float32, np.float64, np.int8, np.uint8, np.bool_, np.complex128,
          ml_dtypes.float8_e4m3fn]


def _random(shape, dtype, rng):
    raw = rng.integers(0, 256, size=tuple(shape) + (np.dtype(dtype).itemsize,), dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (16, 8), (257, 72), (300, 1030), (7, 4096)])
def test_transpose_matches_numpy(dtype, shape):
    a = _random(shape, dtype, np.random.default_rng(0))
    got = transpose_into(a)
    assert got.flags.c_contiguous and got.shape == shape[::-1]
    np.testing.assert_array_equal(got.view(np.uint8), np.ascontiguousarray(a.T).view(np.uint8))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32])
def test_transpose_of_column_slices_and_odd_offsets(dtype):
    """Pieces of a tensor are column slices; a slice may start at any column (unaligned to 16 bytes)."""
    rng = np.random.default_rng(1)
    base = _random((300, 1031), dtype, rng)
    for a0, a1 in [(0, 512), (8, 520), (3, 700), (1, 2), (1024, 1031)]:
        a = base[:, a0:a1]
        out = np.full((a1 - a0, 300), 7, dtype)
        assert transpose_into(a, out) is out
        np.testing.assert_array_equal(out.view(np.uint8), np.ascontiguousarray(a.T).view(np.uint8))
    strided = base[::2, ::3]  # neither axis contiguous: element-wise path
    np.testing.assert_array_equal(transpose_into(strided).view(np.uint8), np.ascontiguousarray(strided.T).view(np.uint8))


def test_transpose_rejects_bad_out():
    a = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="out must be C-contiguous float32 of shape"):
        transpose_into(a, np.zeros((4, 6), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        transpose_into(np.zeros((2, 3, 4)))


def test_contiguous_into_stacked_transposes_and_plain_views():
    rng = np.random.default_rng(2)
    x = _random((3, 40, 24), ml_dtypes.bfloat16, rng)
    for view in [x.transpose(0, 2, 1), x[:, :20].transpose(0, 2, 1), x[1].T, x[1, 5:9], x[:, ::2]]:
        out = np.empty(view.shape, view.dtype)
        got = contiguous_into(view, out)
        assert got is out
        np.testing.assert_array_equal(got.view(np.uint8), np.ascontiguousarray(view).view(np.uint8))
        np.testing.assert_array_equal(contiguous_into(view).view(np.uint8), np.ascontiguousarray(view).view(np.uint8))
