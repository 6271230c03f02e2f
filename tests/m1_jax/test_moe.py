"""Mixture of experts: dense (reference) and ragged (grouped matmul) paths on uneven routing, and both
against a per-token numpy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import m1_jax
from m1_jax.layers.moe import MoE, route
from tiny_models import tiny_config

TOL = 1e-5  # relative to the largest entry of the compared array (fp32)
E, D, I = 6, 32, 24


@pytest.fixture(scope="module")
def skewed():
    """A MoE layer whose router sends every token to expert 0 and none to expert 5."""
    cfg = tiny_config(hidden_size=D, intermediate_size=I, num_local_experts=E, initializer_range=0.2)
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    gate = np.array(moe.gate[...])
    mean_dir = np.ones(D, np.float32) / np.sqrt(D)  # the inputs have a mean component along it
    gate[:, 0] += 1.5 * mean_dir
    gate[:, E - 1] -= 3.0 * mean_dir
    moe.gate[...] = jnp.asarray(gate)
    x = jax.random.normal(jax.random.key(1), (2, 19, D)) + 1.0
    _, _, experts = route(x, moe.gate[...], cfg.num_experts_per_tok)
    counts = np.bincount(np.asarray(experts).ravel(), minlength=E)
    assert counts[0] == 2 * 19 and counts[E - 1] == 0 and counts[1:E - 1].min() >= 1, counts
    return moe, x


def _close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(np.abs(b).max(), 1e-30)
    assert np.abs(b).max() > 0, f"{what}: all zero"
    err = np.abs(a - b).max() / scale
    assert err <= TOL, f"{what}: max |diff| / max |ref| = {err:.2e} > {TOL}"


def _numpy_moe(moe: MoE, x):
    """Token by token: fp32 softmax router, top-2 renormalised, SwiGLU experts."""
    x = np.asarray(x, np.float64).reshape(-1, D)
    g, w1, w3, w2 = (np.asarray(moe.gate[...], np.float64), np.asarray(moe.w1[...], np.float64),
                     np.asarray(moe.w3[...], np.float64), np.asarray(moe.w2[...], np.float64))
    out = np.zeros_like(x)
    for n, xn in enumerate(x):
        logits = xn @ g
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p)[:2]
        for e in top:
            a = xn @ w1[e]
            h = a / (1 + np.exp(-a)) * (xn @ w3[e])
            out[n] += p[e] / p[top].sum() * (h @ w2[e])
    return out


def _loss(moe, x, impl):
    y, _, _ = moe(x, impl=impl)
    return jnp.sum(y * jnp.sin(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)))


def test_dense_and_ragged_outputs_match_oracle(skewed):
    moe, x = skewed
    ref = _numpy_moe(moe, x)
    for impl in ("dense", "ragged"):
        y, logits, aux = moe(x, impl=impl)
        assert y.shape == x.shape and logits.shape == (2, 19, E)
        _close(np.asarray(y).reshape(-1, D), ref, f"{impl} output vs numpy")
    yd, _, auxd = moe(x, impl="dense")
    yr, _, auxr = moe(x, impl="ragged")
    _close(yr, yd, "ragged vs dense output")
    assert float(auxd) == float(auxr)


def test_dense_and_ragged_gradients_match(skewed):
    moe, x = skewed
    grads = {}
    for impl in ("dense", "ragged"):
        grads[impl] = nnx.grad(_loss, argnums=(0, 1))(moe, x, impl)
    (gmd, gxd), (gmr, gxr) = grads["dense"], grads["ragged"]
    _close(gxr, gxd, "d/dx")
    for name in ("w1", "w3", "w2", "gate"):
        _close(getattr(gmr, name)[...], getattr(gmd, name)[...], f"d/d{name}")
    # Expert 5 received no token: its gradient is exactly zero on both paths; expert 0's is not.
    for g in (gmd, gmr):
        assert not np.asarray(g.w1[...])[E - 1].any() and np.asarray(g.w1[...])[0].any()


def test_aux_loss_counts_only_real_tokens(skewed):
    """With a token mask the load-balancing loss is the one of the real tokens alone."""
    from m1_jax.layers.moe import load_balancing_loss

    moe, x = skewed
    logits, _, experts = route(x, moe.gate[...], 2)
    mask = np.zeros(x.shape[:2], bool)
    mask[0, :11], mask[1, :4] = True, True
    real = np.asarray(mask).reshape(-1)
    want = load_balancing_loss(np.asarray(logits).reshape(-1, E)[real], np.asarray(experts).reshape(-1, 2)[real], E)
    got = load_balancing_loss(logits, experts, E, jnp.asarray(mask))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    assert abs(float(load_balancing_loss(logits, experts, E)) - float(want)) > 1e-3  # padding would change it
    np.testing.assert_allclose(float(load_balancing_loss(logits, experts, E, jnp.ones(mask.shape, bool))),
                               float(load_balancing_loss(logits, experts, E)), rtol=1e-6)


def test_model_aux_loss_ignores_padding():
    """A row padded at the end (segment id 0) has the aux loss of the same row unpadded, layer by layer."""
    cfg = tiny_config()
    model = m1_jax.init_model(cfg, seed=0)
    ids = jax.random.randint(jax.random.key(2), (1, 24), 0, cfg.vocab_size)
    seg = jnp.asarray([[1] * 17 + [0] * 7])
    padded = model.forward(ids, segment_ids=seg)
    alone = model.forward(ids[:, :17])
    np.testing.assert_allclose(np.asarray(padded.aux_loss_per_layer), np.asarray(alone.aux_loss_per_layer),
                               rtol=1e-5)
