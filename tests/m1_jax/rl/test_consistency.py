"""The train/inference consistency figure: Pearson correlation and differences of two log-prob arrays over the
masked tokens only, and clear errors where the correlation is undefined."""

import numpy as np
import pytest

from m1_jax.rl.consistency import logprob_agreement, logprob_correlation


def _pair(seed=0, shape=(4, 9)):
    rng = np.random.default_rng(seed)
    behaviour = rng.normal(-2.0, 1.0, shape).astype(np.float32)
    update = (behaviour + rng.normal(0.0, 0.3, shape)).astype(np.float32)
    mask = (rng.random(shape) < 0.6).astype(np.float32)
    return behaviour, update, mask


def test_correlation_is_pearsons_over_the_masked_tokens():
    behaviour, update, mask = _pair()
    keep = mask > 0
    want = np.corrcoef(behaviour[keep].astype(np.float64), update[keep].astype(np.float64))[0, 1]
    got = logprob_correlation(behaviour, update, mask)
    assert isinstance(got, float) and 0.5 < got < 0.99
    assert got == pytest.approx(want, abs=1e-12)
    # what lies outside the mask does not count
    noisy = np.where(keep, update, 1e3 * np.random.default_rng(1).normal(size=update.shape))
    assert logprob_correlation(behaviour, noisy, mask) == pytest.approx(want, abs=1e-12)
    assert logprob_correlation(behaviour, noisy, keep) == pytest.approx(want, abs=1e-12)  # a bool mask too
    # an affine image correlates perfectly, a negated one at -1
    assert logprob_correlation(behaviour, 3 * behaviour - 1, mask) == pytest.approx(1.0, abs=1e-12)
    assert logprob_correlation(behaviour, -behaviour, mask) == pytest.approx(-1.0, abs=1e-12)


def test_agreement_row():
    behaviour, update, mask = _pair(seed=2)
    keep = mask > 0
    diff = np.abs(behaviour[keep].astype(np.float64) - update[keep])
    row = logprob_agreement(behaviour, update, mask)
    assert row == {"correlation": logprob_correlation(behaviour, update, mask),
                   "mean_abs_diff": pytest.approx(diff.mean(), rel=1e-12),
                   "max_abs_diff": pytest.approx(diff.max(), rel=1e-12), "tokens": int(keep.sum())}
    assert row["tokens"] < mask.size


def test_undefined_correlations_are_clear_errors():
    behaviour, update, mask = _pair()
    one = np.zeros_like(mask)
    one[0, 0] = 1
    with pytest.raises(ValueError, match="at least 2 tokens in mask, got 1"):
        logprob_correlation(behaviour, update, one)
    with pytest.raises(ValueError, match="at least 2 tokens in mask, got 0"):
        logprob_agreement(behaviour, update, np.zeros_like(mask))
    with pytest.raises(ValueError, match=r"the update log-probs are constant over the \d+ tokens in mask"):
        logprob_correlation(behaviour, np.full_like(update, -1.5), mask)
    with pytest.raises(ValueError, match=r"the behaviour log-probs are constant"):
        logprob_correlation(np.zeros_like(behaviour), update, mask)
    with pytest.raises(ValueError, match=r"same shape, got \(4, 9\), \(4, 8\) and \(4, 9\)"):
        logprob_correlation(behaviour, update[:, 1:], mask)
