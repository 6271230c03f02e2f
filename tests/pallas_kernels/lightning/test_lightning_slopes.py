import numpy as np
import pytest

from pallas_kernels.lightning import alibi_slopes, m1_slopes


def test_m1_table_values():
    s0 = m1_slopes(64, 0, 80)
    s78 = m1_slopes(64, 78, 80)
    assert s0.dtype == np.float32 and s0.shape == (64,)
    np.testing.assert_allclose(s0[[0, 7, 63]], [0.91701323, 0.50000501, 0.0039062891], rtol=1e-7)
    np.testing.assert_allclose(s78[[0, 63]], [0.011616816, 4.9485e-05], rtol=1e-5)


def test_power_of_two_closed_form():
    for h in (1, 2, 4, 8, 64):
        want = 2.0 ** (-8.0 * (np.arange(h) + 1) / h) * (1 - 3 / 9 + 1e-5)
        np.testing.assert_allclose(m1_slopes(h, 3, 10), want.astype(np.float32), rtol=1e-7)


def test_non_power_of_two_interleave():
    # closest power 4: 2^-2, 2^-4, 2^-6, 2^-8, then slopes(8)[0::2][:2] = 2^-1, 2^-3.
    np.testing.assert_allclose(alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])
    assert len(alibi_slopes(12)) == 12


def test_single_layer_and_errors():
    np.testing.assert_allclose(m1_slopes(2, 0, 1), np.array([2**-4, 2**-8]) * (1 + 1e-5), rtol=1e-7)
    with pytest.raises(ValueError, match="layer_idx"):
        m1_slopes(4, 4, 4)
    with pytest.raises(ValueError, match="num_heads"):
        m1_slopes(0, 0, 4)
