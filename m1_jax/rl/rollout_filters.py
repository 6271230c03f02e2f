"""Filters applied to sampled responses before the update (NumPy, on the host).

* Dynamic sampling (DAPO): a group whose responses all score the same has zero advantage everywhere, so it
  carries no gradient and only dilutes the token count; :func:`informative_groups` says which groups to keep
  (the loop drops the others and samples more prompts to refill the batch).
* M1's repetition stop (the MiniMax-M1 report's early truncation): a response is ended once
  ``run_length`` consecutive tokens were each sampled with probability > ``threshold`` (0.99; the report
  used 3,000 tokens), the sign of a model repeating itself, which the report cuts short to keep training
  stable. :func:`repetition_stop` gives the index where each response ends, from the probabilities the
  rollout recorded (``exp`` of :attr:`m1_jax.generation.Generation.logprobs`); the tokens after it are
  dropped from the update. It runs after generation: it truncates the training data, it does not save
  the decode steps past the stop.
"""

from __future__ import annotations

import numpy as np


def informative_groups(rewards) -> np.ndarray:
    """bool [num_groups]: True for the groups whose rewards are not all equal, from rewards [num_groups, G]."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2 or r.shape[1] < 1:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {r.shape}")
    if not np.isfinite(r).all():
        g = int(np.argwhere(~np.isfinite(r))[0, 0])
        raise ValueError(f"rewards must be finite; group {g} holds {r[g].tolist()}")
    return r.max(axis=1) != r.min(axis=1)


def repetition_stop(probs, mask, *, run_length: int, threshold: float = 0.99) -> np.ndarray:
    """int [batch]: where each response ends (exclusive index into ``time``).

    ``probs`` [batch, time]: the probability each sampled token had; ``mask`` [batch, time]: 1 on the
    response's tokens. A response ends right after the ``run_length``-th of ``run_length`` consecutive
    response tokens whose probability is > ``threshold`` (a position outside the mask breaks the run);
    a response without such a run ends after its last masked-in token (0 if it has none).
    """
    if isinstance(run_length, bool) or not isinstance(run_length, (int, np.integer)) or run_length < 1:
        raise ValueError(f"run_length must be an integer >= 1, got {run_length!r}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    p, m = np.asarray(probs), np.asarray(mask) > 0
    if p.ndim != 2 or p.shape != m.shape:
        raise ValueError(f"probs {p.shape} and mask {m.shape} must both be [batch, time]")
    T = p.shape[1]
    t = np.arange(T)
    high = m & (p > threshold)
    last_break = np.maximum.accumulate(np.where(high, -1, t), axis=1)  # latest position not in a run, or -1
    reached = (t - last_break) >= run_length                           # the run ending at t is long enough
    end = np.where(m.any(axis=1), T - np.argmax(m[:, ::-1], axis=1), 0)
    return np.where(reached.any(axis=1), np.argmax(reached, axis=1) + 1, end).astype(np.int32)
