"""Train/inference consistency (the MiniMax-M1 report's figure 3): how closely the behaviour log-probs that the
sampler recorded agree with those the update step computes for the same tokens with the same weights.

The report measured the Pearson correlation of the two over sampled tokens: 0.987 with a bf16 output head and
0.997 with a float32 one (:class:`m1_jax.model.M1Model` ``head_dtype``). NumPy only, float64.
"""

from __future__ import annotations

import numpy as np


def _masked(behaviour, update, mask) -> tuple[np.ndarray, np.ndarray]:
    """The two arrays' values where ``mask`` is non-zero, float64, after checking that the shapes agree."""
    b, u, m = np.asarray(behaviour), np.asarray(update), np.asarray(mask)
    if not (b.shape == u.shape == m.shape):
        raise ValueError(f"behaviour, update and mask must have the same shape, got {b.shape}, {u.shape} and "
                         f"{m.shape}")
    keep = m != 0
    return b[keep].astype(np.float64), u[keep].astype(np.float64)


def logprob_correlation(behaviour, update, mask) -> float:
    """The Pearson correlation of ``behaviour`` and ``update`` (log-probs, any shape) over the tokens where
    ``mask`` is non-zero, computed in float64. A ValueError when fewer than 2 tokens are masked in or either
    side is constant over them (the correlation is undefined)."""
    b, u = _masked(behaviour, update, mask)
    if b.size < 2:
        raise ValueError(f"the correlation needs at least 2 tokens in mask, got {b.size}")
    db, du = b - b.mean(), u - u.mean()
    sb, su = np.sqrt(np.sum(db * db)), np.sqrt(np.sum(du * du))
    if sb == 0 or su == 0:
        raise ValueError(f"the {'behaviour' if sb == 0 else 'update'} log-probs are constant over the {b.size} "
                         "tokens in mask, so their correlation is undefined")
    return float(np.clip(np.sum(db * du) / (sb * su), -1.0, 1.0))


def logprob_agreement(behaviour, update, mask) -> dict[str, float | int]:
    """The figure's row: ``correlation`` (:func:`logprob_correlation`), ``mean_abs_diff`` and ``max_abs_diff``
    of the two log-probs, and ``tokens``, over the tokens where ``mask`` is non-zero."""
    b, u = _masked(behaviour, update, mask)
    diff = np.abs(b - u)
    return {"correlation": logprob_correlation(behaviour, update, mask), "mean_abs_diff": float(diff.mean()),
            "max_abs_diff": float(diff.max()), "tokens": int(b.size)}
