"""Rollouts: the group layout, prompts of different lengths, stopping, and behaviour log-probs equal to a fresh
forward's log-softmax at each response token (also through the update step: ratio 1 before any update)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import tiny_config

from m1_jax import sharding
from m1_jax.config import FULL, LINEAR
from m1_jax.model import init_model
from m1_jax.rl import rollout as rl
from m1_jax.rl import update
from m1_jax.train import FAST_COMPILE

PROMPTS = [[5, 17, 200], [9, 8, 7, 6, 5, 4, 3], [300, 301]]
G, NEW = 2, 6


@pytest.fixture(scope="module")
def model():
    return init_model(tiny_config(layer_types=[LINEAR, FULL]), seed=0)  # one layer of each kind


@pytest.fixture(scope="module")
def sampled(model):
    return rl.rollout(model, PROMPTS, group_size=G, max_new_tokens=NEW, temperature=1.0, seed=3)


def test_group_layout_and_prompt_lengths(sampled):
    r = sampled
    N, L = len(PROMPTS) * G, max(map(len, PROMPTS)) + NEW
    assert r.tokens.shape == r.response_mask.shape == r.logprobs.shape == (N, L)
    assert r.tokens.dtype == np.int32 and r.logprobs.dtype == np.float32
    np.testing.assert_array_equal(r.group, np.repeat(np.arange(len(PROMPTS)), G))
    np.testing.assert_array_equal(r.prompt_lengths, np.repeat([len(p) for p in PROMPTS], G))
    np.testing.assert_array_equal(r.response_lengths, NEW)  # no stop: every row runs to max_new_tokens
    for n in range(N):
        p = len(PROMPTS[n // G])
        assert r.tokens[n, :p].tolist() == PROMPTS[n // G]
        assert r.response_mask[n].tolist() == [0.0] * p + [1.0] * NEW + [0.0] * (L - p - NEW)
        assert (r.tokens[n, p + NEW:] == rl.PAD).all() and (r.logprobs[n, r.response_mask[n] == 0] == 0).all()
        assert r.response(n).tolist() == r.tokens[n, p: p + NEW].tolist()
    # The G samples of one prompt are drawn independently.
    assert any(r.responses()[g * G] != r.responses()[g * G + 1] for g in range(len(PROMPTS)))


def test_logprobs_equal_a_fresh_forward(model, sampled):
    r = sampled
    logits = nnx.jit(lambda m, x: m.forward(x).logits)(model, jnp.asarray(r.tokens))
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    for n, t in zip(*np.nonzero(r.response_mask)):
        np.testing.assert_allclose(r.logprobs[n, t], logp[n, t - 1, r.tokens[n, t]], rtol=1e-5, atol=1e-5)


def test_stop_token_ends_the_response(model):
    greedy = rl.rollout(model, PROMPTS, group_size=G, max_new_tokens=NEW, temperature=0.0)
    eos = int(greedy.response(0)[2])  # prompt 0's third greedy token
    k = greedy.response(0).tolist().index(eos) + 1  # the response ends at its first occurrence
    r = rl.rollout(model, PROMPTS, group_size=G, max_new_tokens=NEW, temperature=0.0, eos_token_id=eos, length=16)
    assert r.tokens.shape == (len(PROMPTS) * G, 16)
    assert r.response_lengths[0] == r.response_lengths[1] == k and r.response(0)[-1] == eos
    p = len(PROMPTS[0])
    assert r.response_mask[0].sum() == k and (r.tokens[0, p + k:] == rl.PAD).all()
    with pytest.raises(ValueError, match="length=8"):
        rl.rollout(model, PROMPTS, group_size=G, max_new_tokens=NEW, length=8)
    with pytest.raises(ValueError, match="group_size"):
        rl.rollout(model, PROMPTS, group_size=0, max_new_tokens=NEW)


def test_update_batch_reproduces_the_behaviour_policy(model, sampled):
    """Before any update the step's log-probs of the sampled tokens equal the rollout's: every ratio is 1."""
    adv = np.linspace(-1.0, 1.0, sampled.tokens.shape[0]).astype(np.float32)
    batch = rl.to_update_batch(sampled, adv)
    assert set(batch) == {"tokens", "loss_mask", "old_logprobs", "advantages"}
    ps = update.build_policy_state(model, sharding.make_mesh("data=1", jax.devices()[:1]), update.UpdateOptions(),
                                   compiler_options=FAST_COMPILE)
    m = ps.update(batch)
    assert float(m["tokens"]) == sampled.response_mask.sum()
    np.testing.assert_allclose(float(m["ratio_mean"]), 1.0, atol=1e-5)
    assert float(m["clip_fraction"]) == 0.0 and abs(float(m["approx_kl"])) < 1e-6
    with pytest.raises(ValueError, match="one value per rollout row"):
        rl.to_update_batch(sampled, adv[:-1])
