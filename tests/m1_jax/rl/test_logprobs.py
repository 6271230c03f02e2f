"""Per-token log-probabilities and entropies from logits."""

import jax
import jax.numpy as jnp
import numpy as np

from m1_jax.rl.logprobs import token_entropy, token_logprobs


def test_token_logprobs_pick_the_log_softmax_of_each_target():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 3))
    ls = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = np.take_along_axis(ls, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(targets))), expected,
                               rtol=1e-5, atol=1e-6)
    assert token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets)).dtype == jnp.float32


def test_token_entropy():
    V = 6
    logits = np.zeros((1, 3, V), np.float32)
    logits[0, 1] = [0.0, -np.inf, -np.inf, -np.inf, -np.inf, -np.inf]  # one-hot
    logits[0, 2] = [np.log(0.5), np.log(0.5), -np.inf, -np.inf, -np.inf, -np.inf]
    got = np.asarray(token_entropy(jnp.asarray(logits)))
    np.testing.assert_allclose(got, [[np.log(V), 0.0, np.log(2)]], atol=1e-6)
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2, 2, V)).astype(np.float32)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(token_entropy(jnp.asarray(z))), -(p * np.log(p)).sum(-1), rtol=1e-5)
    # Masked-out (-inf) entries give a finite gradient.
    g = jax.grad(lambda x: token_entropy(x).sum())(jnp.asarray(logits))
    assert np.isfinite(np.asarray(g)).all()
