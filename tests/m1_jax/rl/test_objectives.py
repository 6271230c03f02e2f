"""The RL objectives (CISPO, GRPO, DAPO) against gradients computed by hand, their normalisation, metrics
and table; group advantages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1_jax.rl.logprobs import token_logprobs
from m1_jax.rl.objectives import (
    CISPO_EPS_HIGH,
    OBJECTIVES,
    cispo,
    dapo,
    flat_group_advantages,
    group_advantages,
    grpo,
    make_objective,
)

# Two responses of 3 and 2 tokens (row 1 padded), advantages +1.5 and -0.5. Log-ratios chosen so that some
# tokens fall outside [0.8, 1.28] on each side: ratios e^0.5=1.65, e^-0.1=0.90, e^-2=0.14 | e^0.3=1.35, e^-0.5=0.61.
OLD = np.array([[-1.0, -2.0, -0.5], [-1.5, -0.7, 0.0]], np.float32)
LOG_RATIO = np.array([[0.5, -0.1, -2.0], [0.3, -0.5, 0.0]], np.float32)
NEW = OLD + LOG_RATIO
MASK = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
ADV = np.array([1.5, -0.5], np.float32)
RATIO = np.exp(LOG_RATIO)


def grad_wrt_logprobs(fn, new=NEW, **kw):
    return np.asarray(jax.grad(lambda lp: fn(lp, OLD, ADV, MASK, **kw)[0])(jnp.asarray(new)))


# ----------------------------------------------------------------------------------- CISPO
def test_cispo_gradient_is_the_clipped_weight_times_advantage_times_grad_log_pi():
    """A tiny softmax policy (logits are the parameters): d loss / d logits = -(1/N) sum sg(clip r) A grad log pi,
    with grad log pi = onehot(token) - softmax, and clipped tokens keep their gradient at weight 1 + eps_high."""
    rng = np.random.default_rng(0)
    B, T, V = 2, 3, 5
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T))
    logp_new = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
    old = logp_new - LOG_RATIO  # the same ratios as above
    old[1, 2] = np.nan          # padding may hold anything

    def loss(z):
        return cispo(token_logprobs(z, jnp.asarray(tokens)), old, ADV, MASK)[0]

    got = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    grad_log_pi = np.eye(V)[tokens] - p                             # [B, T, V]
    weight = np.minimum(RATIO, 1 + CISPO_EPS_HIGH)                 # no lower bound by default
    N = MASK.sum()
    expected = -(weight * ADV[:, None] * MASK)[..., None] * grad_log_pi / N
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    # The tokens past the upper bound (ratios 1.65 and 1.35) and the one far below (0.14) still move.
    for b, t in ((0, 0), (1, 0), (0, 2)):
        assert np.abs(got[b, t]).max() > 1e-3
    assert np.all(got[1, 2] == 0)  # padding


def test_cispo_loss_value_and_bounds():
    loss, _ = cispo(NEW, OLD, ADV, MASK, eps_low=0.2, eps_high=0.28)
    w = np.clip(RATIO, 0.8, 1.28)
    expected = -(w * ADV[:, None] * NEW * MASK).sum() / MASK.sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    # eps_low=None and eps_high=None: the raw ratio is the weight.
    g = grad_wrt_logprobs(cispo, eps_high=None)
    np.testing.assert_allclose(g, -(RATIO * ADV[:, None] * MASK) / MASK.sum(), rtol=1e-6)


def test_cispo_token_mask_form_is_the_ppo_trust_region():
    """Eq. 6-7: without IS clipping and with the mask at PPO's bounds, CISPO's gradient is DAPO's."""
    masked = grad_wrt_logprobs(cispo, eps_high=None, mask_eps_low=0.2, mask_eps_high=0.28)
    np.testing.assert_allclose(masked, grad_wrt_logprobs(dapo), rtol=1e-6, atol=1e-8)
    _, m = cispo(NEW, OLD, ADV, MASK, eps_high=None, mask_eps_low=0.2, mask_eps_high=0.28)
    # Cut: (0, 0) with A > 0 and r = 1.65; (1, 1) with A < 0 and r = 0.61.
    np.testing.assert_allclose(float(m["zero_grad_fraction"]), 2 / 5, rtol=1e-6)


# ----------------------------------------------------------------------------------- GRPO / DAPO
def cut_tokens(lo, hi):
    A = np.broadcast_to(ADV[:, None], RATIO.shape)
    return ((A > 0) & (RATIO > hi)) | ((A < 0) & (RATIO < lo))


def test_grpo_clipped_tokens_get_no_gradient():
    g = grad_wrt_logprobs(grpo)
    cut = cut_tokens(0.8, 1.2) & (MASK > 0)
    assert cut.sum() == 2  # (0, 0): A > 0, r = 1.65; (1, 1): A < 0, r = 0.61
    assert np.all(g[cut] == 0)
    lengths = MASK.sum(1, keepdims=True)
    expected = np.where(cut, 0.0, -(RATIO * ADV[:, None] * MASK) / lengths / 2)  # 2 sequences
    np.testing.assert_allclose(g, expected, rtol=1e-6, atol=1e-8)
    # CISPO at the same bounds keeps those tokens.
    assert np.all(grad_wrt_logprobs(cispo, eps_low=0.2, eps_high=0.2)[cut] != 0)


def test_dapo_gradient_by_hand():
    g = grad_wrt_logprobs(dapo)
    cut = cut_tokens(0.8, 1.28)
    expected = np.where(cut, 0.0, -(RATIO * ADV[:, None] * MASK) / MASK.sum())
    np.testing.assert_allclose(g, expected, rtol=1e-6, atol=1e-8)


def test_token_level_and_per_sequence_normalisation_differ_as_they_should():
    """At ratio 1, lengths 1 and 3, A = +1 and -1: per token (DAPO, CISPO) the long response weighs 3x,
    per sequence (GRPO) both weigh the same."""
    mask = np.array([[1, 0, 0], [1, 1, 1]], np.float32)
    lp = np.full((2, 3), -1.0, np.float32)
    adv = np.array([1.0, -1.0], np.float32)
    # The surrogate -r*A at r = 1: DAPO = -(1*1 + 3*(-1)) / 4 = 0.5; GRPO = -(1 + (-1)) / 2 = 0.
    np.testing.assert_allclose(float(dapo(lp, lp, adv, mask)[0]), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(grpo(lp, lp, adv, mask)[0]), 0.0, atol=1e-7)
    g_tok = np.asarray(jax.grad(lambda x: dapo(x, lp, adv, mask)[0])(jnp.asarray(lp)))
    g_seq = np.asarray(jax.grad(lambda x: grpo(x, lp, adv, mask)[0])(jnp.asarray(lp)))
    np.testing.assert_allclose(g_tok, -adv[:, None] * mask / 4, rtol=1e-6)
    np.testing.assert_allclose(g_seq, -adv[:, None] * mask / mask.sum(1, keepdims=True) / 2, rtol=1e-6)
    g_cispo = np.asarray(jax.grad(lambda x: cispo(x, lp, adv, mask)[0])(jnp.asarray(lp)))
    np.testing.assert_allclose(g_cispo, g_tok, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_micro_batches_sum_to_the_batch(name):
    """Each micro-batch normalised by the whole batch's counts: the losses and gradients add up."""
    fn = OBJECTIVES[name].fn
    full, _ = fn(NEW, OLD, ADV, MASK)
    totals = {"num_tokens": MASK.sum(), "num_sequences": 2.0}
    parts = [fn(NEW[i:i + 1], OLD[i:i + 1], ADV[i:i + 1], MASK[i:i + 1], **totals)[0] for i in range(2)]
    np.testing.assert_allclose(float(sum(parts)), float(full), rtol=1e-6)


def test_padding_with_garbage_does_not_reach_loss_or_gradient():
    new, old = NEW.copy(), OLD.copy()
    new[1, 2], old[1, 2] = -np.inf, np.nan
    for name, entry in OBJECTIVES.items():
        fn = entry.fn
        loss, metrics = fn(new, old, ADV, MASK)
        g = np.asarray(jax.grad(lambda x, fn=fn: fn(x, old, ADV, MASK)[0])(jnp.asarray(new)))
        assert np.isfinite(float(loss)) and np.isfinite(g).all() and g[1, 2] == 0, name
        np.testing.assert_allclose(float(loss), float(fn(NEW, OLD, ADV, MASK)[0]), rtol=1e-6)
        assert all(np.isfinite(float(v)) for v in metrics.values()), name


def test_per_token_advantages():
    adv = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 9.0]], np.float32)
    g = np.asarray(jax.grad(lambda x: cispo(x, OLD, adv, MASK, eps_high=None)[0])(jnp.asarray(NEW)))
    np.testing.assert_allclose(g, -(RATIO * adv * MASK) / MASK.sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="advantages must be"):
        cispo(NEW, OLD, np.ones(3), MASK)


# ----------------------------------------------------------------------------------- KL and metrics
def test_kl_term_against_a_reference():
    ref = NEW - 0.3
    base = grad_wrt_logprobs(dapo)
    g = grad_wrt_logprobs(dapo, ref_logprobs=ref, kl_coef=0.1)
    # d/dlogp k3 = d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp)
    np.testing.assert_allclose(g - base, 0.1 * (1 - np.exp(-0.3)) * MASK / MASK.sum(), rtol=1e-5, atol=1e-8)
    _, m = dapo(NEW, OLD, ADV, MASK, ref_logprobs=ref, kl_coef=0.1)
    np.testing.assert_allclose(float(m["ref_kl"]), np.exp(-0.3) + 0.3 - 1, rtol=1e-5)
    # Off by default: a reference alone changes nothing.
    assert float(dapo(NEW, OLD, ADV, MASK, ref_logprobs=ref)[0]) == float(dapo(NEW, OLD, ADV, MASK)[0])
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        cispo(NEW, OLD, ADV, MASK, kl_coef=0.1)


def test_metrics():
    entropy = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]], np.float32)
    _, m = cispo(NEW, OLD, ADV, MASK, eps_low=0.2, eps_high=0.28, entropy=entropy)
    valid = MASK > 0
    r = RATIO[valid]
    np.testing.assert_allclose(float(m["clip_fraction"]), np.mean((r > 1.28) | (r < 0.8)), rtol=1e-6)  # 4 of 5
    assert float(m["zero_grad_fraction"]) == 0.0
    np.testing.assert_allclose(float(m["approx_kl"]), np.mean(r - 1 - np.log(r)), rtol=1e-5)
    np.testing.assert_allclose(float(m["ratio_mean"]), r.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(m["entropy"]), 3.0, rtol=1e-6)
    assert float(m["tokens"]) == 5.0
    _, m = grpo(NEW, OLD, ADV, MASK)
    np.testing.assert_allclose(float(m["zero_grad_fraction"]), 2 / 5, rtol=1e-6)


# ----------------------------------------------------------------------------------- the table
def test_objective_table_and_options():
    assert set(OBJECTIVES) == {"cispo", "grpo", "dapo"}
    assert OBJECTIVES["cispo"].options["eps_low"] is None
    assert OBJECTIVES["cispo"].options["eps_high"] == CISPO_EPS_HIGH
    assert (OBJECTIVES["dapo"].options["eps_low"], OBJECTIVES["dapo"].options["eps_high"]) == (0.2, 0.28)
    assert (OBJECTIVES["grpo"].normalisation, OBJECTIVES["dapo"].normalisation) == ("sequence", "token")
    assert OBJECTIVES["dapo"].dynamic_sampling and not OBJECTIVES["cispo"].dynamic_sampling
    fn = jax.jit(make_objective("cispo", eps_high=None))
    np.testing.assert_allclose(float(fn(NEW, OLD, ADV, MASK)[0]), float(cispo(NEW, OLD, ADV, MASK, eps_high=None)[0]),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="objective 'ppo' is not one of cispo, grpo, dapo"):
        make_objective("ppo")
    with pytest.raises(ValueError, match="objective 'grpo' has no option 'mask_eps_high'"):
        make_objective("grpo", mask_eps_high=0.2)
    with pytest.raises(ValueError, match="eps_high must be None"):
        make_objective("dapo", eps_high=-1)
    with pytest.raises(ValueError, match="kl_coef must be"):
        make_objective("cispo", kl_coef=-0.1)


# ----------------------------------------------------------------------------------- advantages
def test_group_advantages():
    rewards = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]], np.float32)
    got = np.asarray(group_advantages(rewards))
    expected = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(group_advantages(np.array([[0.0, 1.0]]))), [[-1.0, 1.0]], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(group_advantages(rewards, scale_by_std=False)),
                               rewards - rewards.mean(1, keepdims=True))
    np.testing.assert_allclose(np.asarray(flat_group_advantages(rewards.reshape(-1), 4)), expected.reshape(-1),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="group_size=3"):
        flat_group_advantages(rewards.reshape(-1), 3)


def test_a_group_of_equal_rewards_has_zero_advantage():
    rewards = np.array([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]], np.float32)
    got = np.asarray(group_advantages(rewards, eps=0.0))
    assert np.isfinite(got).all()
    assert np.all(got[:2] == 0.0)
    assert np.all(got[2] != 0.0)
