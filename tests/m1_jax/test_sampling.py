"""Sampling parameters: one validation, whose errors name the Python argument."""

import pytest

from m1_jax.sampling import SamplingArgumentError, SamplingParams


def test_defaults_and_off_values():
    assert SamplingParams.create() == SamplingParams(0.0, 0, 1.0)
    assert SamplingParams.create().greedy
    assert SamplingParams.create(temperature=0.7, top_k=0, top_p=1).top_p == 1.0
    assert SamplingParams.create(temperature=1, top_k=50, vocab_size=32) == SamplingParams(1.0, 32, 1.0)


@pytest.mark.parametrize("kw, argument, problem", [
    ({"temperature": -0.5}, "temperature", "must be a finite number >= 0, got -0.5"),
    ({"temperature": float("nan")}, "temperature", "must be a finite number >= 0, got nan"),
    ({"temperature": float("inf")}, "temperature", "must be a finite number >= 0, got inf"),
    ({"temperature": "warm"}, "temperature", "must be a finite number >= 0, got 'warm'"),
    ({"top_k": -1}, "top_k", "must be an integer >= 0 (0: off), got -1"),
    ({"top_k": 2.0}, "top_k", "must be an integer >= 0 (0: off), got 2.0"),
    ({"top_k": True}, "top_k", "must be an integer >= 0 (0: off), got True"),
    ({"top_p": 0.0}, "top_p", "must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p", "must be in (0, 1], got 1.5"),
    ({"top_p": "most"}, "top_p", "must be in (0, 1], got 'most'"),
])
def test_errors_name_the_argument(kw, argument, problem):
    with pytest.raises(SamplingArgumentError) as e:
        SamplingParams.create(**kw)
    assert isinstance(e.value, ValueError)
    assert (e.value.argument, e.value.problem) == (argument, problem)
    assert str(e.value) == f"{argument} {problem}"
