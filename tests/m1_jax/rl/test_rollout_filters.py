"""Dynamic sampling and the repetition stop."""

import numpy as np
import pytest

from m1_jax.rl.rollout_filters import informative_groups, repetition_stop


def test_dynamic_sampling_drops_constant_groups():
    rewards = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.25, 0.25, 0.5]])
    np.testing.assert_array_equal(informative_groups(rewards), [False, True, False, True])
    np.testing.assert_array_equal(informative_groups([[1.0]]), [False])  # one response: nothing to compare
    with pytest.raises(ValueError, match=r"rewards must be finite; group 1 holds \[0.0, nan\]"):
        informative_groups([[0.0, 1.0], [0.0, np.nan]])
    with pytest.raises(ValueError, match="num_groups, group_size"):
        informative_groups([0.0, 1.0])


def test_repetition_stop_ends_a_response_after_n_confident_tokens():
    hi, lo = 0.995, 0.5
    probs = np.array([
        [lo, hi, hi, hi, lo, lo, lo, lo],   # a run of 3 ending at 3 -> ends at 4
        [hi, hi, lo, hi, hi, lo, hi, lo],   # runs of 2 only -> its own end (7)
        [lo, hi, hi, 0.99, hi, hi, hi, lo],  # 0.99 is not > 0.99: the run restarts at 4, 3 long at 6 -> 7
        [hi, hi, hi, hi, hi, hi, hi, hi],   # the run is cut by the mask after 2 tokens -> ends at 2
        [hi, hi, hi, hi, hi, hi, hi, hi],   # no response tokens -> 0
    ])
    mask = np.ones_like(probs)
    mask[1, 7:] = 0
    mask[3, 2:] = 0
    mask[4] = 0
    np.testing.assert_array_equal(repetition_stop(probs, mask, run_length=3), [4, 7, 7, 2, 0])
    np.testing.assert_array_equal(repetition_stop(probs, mask, run_length=2), [3, 2, 3, 2, 0])
    np.testing.assert_array_equal(repetition_stop(probs, mask, run_length=1), [2, 1, 2, 1, 0])
    np.testing.assert_array_equal(repetition_stop(probs, mask, run_length=3, threshold=0.4), [3, 3, 3, 2, 0])
    # A hole in the mask breaks a run.
    holed = np.ones_like(probs[:1])
    holed[0, 2] = 0
    np.testing.assert_array_equal(repetition_stop(np.full((1, 8), hi), holed, run_length=3), [6])


def test_repetition_stop_arguments():
    p, m = np.ones((1, 4)), np.ones((1, 4))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="run_length must be an integer >= 1"):
            repetition_stop(p, m, run_length=bad)
    with pytest.raises(ValueError, match="threshold must be in"):
        repetition_stop(p, m, run_length=2, threshold=1.0)
    with pytest.raises(ValueError, match="probs"):
        repetition_stop(p, np.ones((1, 3)), run_length=2)
