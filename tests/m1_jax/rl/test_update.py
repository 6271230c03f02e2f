"""The RL update step: its loss and gradient equal CISPO computed by hand, micro-batches == one batch, the
8-device mesh == one device, and a non-finite loss leaves the state unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiny_models import tiny_config

from m1_jax import sharding
from m1_jax.config import FULL, LINEAR
from m1_jax.model import init_model
from m1_jax.rl import update
from m1_jax.train import FAST_COMPILE

B, T = 8, 16
EPS_HIGH = 0.1


@pytest.fixture(scope="module")
def cfg():
    return tiny_config(layer_types=[LINEAR, FULL])  # one lightning and one softmax layer: half the compile


def one_device():
    return sharding.make_mesh("data=1", jax.devices()[:1])


def grad_recorder() -> optax.GradientTransformation:
    """Applies nothing and keeps the last gradient as its state."""
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def recorded_grads(ps: update.PolicyState) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.merge(ps.graphdef, ps.state)[1].opt_state)]


def make_batch(model, seed=0) -> dict[str, np.ndarray]:
    """Prompts of 3..6 tokens, responses of 0..9 (one row has none), padding after; old log-probs = the
    model's own plus noise, so that some ratios pass 1 + EPS_HIGH."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 512, (B, T)).astype(np.int32)
    prompt = rng.integers(3, 7, B)
    resp = rng.integers(1, T - 6, B)
    resp[2] = 0
    idx = np.arange(T)[None]
    mask = ((idx >= prompt[:, None]) & (idx < (prompt + resp)[:, None])).astype(np.float32)
    logits = np.asarray(nnx.jit(lambda m, x: m.forward(x).logits)(model, jnp.asarray(tokens)), np.float32)
    lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits[:, :-1])), tokens[:, 1:, None], -1)[..., 0]
    old = np.zeros((B, T), np.float32)
    old[:, 1:] = lp + rng.normal(0, 0.3, lp.shape)
    old *= mask
    return {"tokens": tokens, "loss_mask": mask, "old_logprobs": old,
            "advantages": rng.normal(size=B).astype(np.float32)}


def cispo_by_hand(model, batch):
    """-(1 / sum mask) * sum sg(min(r, 1 + eps_high)) * A * log pi over the response tokens."""
    tokens = jnp.asarray(batch["tokens"])
    logp = jnp.take_along_axis(jax.nn.log_softmax(model.forward(tokens).logits[:, :-1].astype(jnp.float32)),
                               tokens[:, 1:, None], -1)[..., 0]
    mask = jnp.asarray(batch["loss_mask"])[:, 1:]
    old = jnp.asarray(batch["old_logprobs"])[:, 1:]
    weight = jax.lax.stop_gradient(jnp.minimum(jnp.exp(logp - old), 1.0 + EPS_HIGH))
    adv = jnp.asarray(batch["advantages"])[:, None]
    return -jnp.sum(weight * adv * logp * mask) / jnp.sum(mask)


def recording_state(model, mesh, **opts):
    opts = update.UpdateOptions(objective="cispo", objective_options={"eps_high": EPS_HIGH}, **opts)
    return update.PolicyState(model, grad_recorder(), mesh, opts, optax.constant_schedule(0.0),
                              compiler_options=FAST_COMPILE)


def test_loss_and_gradient_equal_cispo_by_hand(cfg):
    model = init_model(cfg, seed=0)
    batch = make_batch(model)
    ps = recording_state(model, one_device())
    m = ps.update(batch)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: cispo_by_hand(nnx.merge(graphdef, p, rest), batch)))(params)
    assert int(m["ok"]) == 1
    np.testing.assert_allclose(float(m["loss"]), float(loss), rtol=1e-5)
    assert float(m["tokens"]) == batch["loss_mask"][:, 1:].sum()
    assert 0.0 < float(m["clip_fraction"]) < 1.0  # the clip is exercised
    got = recorded_grads(ps)
    want = [np.asarray(g) for g in jax.tree.leaves(grads)]
    assert len(got) == len(want)
    scale = max(np.abs(w).max() for w in want)
    assert scale > 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale)


def test_micro_batches_equal_the_whole_batch(cfg):
    model = init_model(cfg, seed=1)
    batch = make_batch(model, seed=1)
    whole = recording_state(model, one_device())
    split = recording_state(model, one_device(), micro_batches=2)
    a, b = whole.update(batch), split.update(batch)
    for k in a:
        np.testing.assert_allclose(float(b[k]), float(a[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    for g, w in zip(recorded_grads(split), recorded_grads(whole)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-8)


def test_sequence_normalised_objective_over_micro_batches(cfg):
    """GRPO divides by the number of responses of the whole batch, not of each micro-batch."""
    model = init_model(cfg, seed=2)
    batch = make_batch(model, seed=2)
    mesh = one_device()
    states = [update.PolicyState(model, grad_recorder(), mesh, update.UpdateOptions(objective="grpo", micro_batches=m),
                                 optax.constant_schedule(0.0), compiler_options=FAST_COMPILE) for m in (1, 4)]
    a, b = (s.update(batch) for s in states)
    np.testing.assert_allclose(float(b["loss"]), float(a["loss"]), rtol=1e-5)
    for g, w in zip(recorded_grads(states[1]), recorded_grads(states[0])):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-8)


def flat_params(ps):
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(ps.params())}


def test_mesh_matches_single_device(cfg):
    model = init_model(cfg, seed=3)
    batch = make_batch(model, seed=3)
    # Adam's first step is lr * g / (|g| + eps): eps 1e-4 instead of RL's 1e-15 keeps rounding noise in tiny
    # gradient entries from moving weights by up to lr (as in the train step's test).
    opt = update.rl_optimizer_section(lr=1e-3, warmup_steps=0, eps=1e-4)
    opts = update.UpdateOptions(objective="cispo")
    one = update.build_policy_state(model, one_device(), opts, optimizer=opt, steps=4, compiler_options=FAST_COMPILE)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    sharded = update.build_policy_state(model, mesh, opts, optimizer=opt, steps=4, compiler_options=FAST_COMPILE)
    ref = [float(one.update(batch)["loss"]) for _ in range(2)]
    got = [float(sharded.update(batch)["loss"]) for _ in range(2)]
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    a, b = flat_params(one), flat_params(sharded)
    start = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=str(k))
    assert sum(not np.array_equal(a[k], start[k]) for k in a) > len(a) // 2  # the steps moved the weights


def test_non_finite_loss_leaves_state_unchanged(cfg):
    model = init_model(cfg, seed=4)
    batch = make_batch(model, seed=4)
    batch["old_logprobs"][0, batch["loss_mask"][0] > 0] = np.nan  # a NaN behaviour log-prob: a NaN loss
    ps = update.build_policy_state(model, one_device(), update.UpdateOptions(), compiler_options=FAST_COMPILE)
    before = jax.tree.map(np.asarray, ps.state)
    m = ps.update(batch)
    assert int(m["ok"]) == 0 and not np.isfinite(float(m["loss"]))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), jax.tree.map(np.asarray, ps.state), before)


def test_rl_optimizer_defaults():
    opt = update.rl_optimizer_section(lr=1e-6)
    assert (opt.b1, opt.b2, opt.eps, opt.lr) == (0.9, 0.95, 1e-15, 1e-6)


def test_missing_batch_key_is_named(cfg):
    model = init_model(cfg, seed=0)
    ps = update.build_policy_state(model, one_device(), update.UpdateOptions(), compiler_options=FAST_COMPILE)
    batch = make_batch(model)
    del batch["advantages"]
    with pytest.raises(ValueError, match="advantages"):
        ps.update(batch)


def test_kl_to_a_reference_adds_k3_per_response_token(cfg):
    """With ``ref_logprobs`` in the batch and ``kl_coef`` > 0 the loss is CISPO's plus kl_coef times the mean
    over response tokens of k3 = exp(ref - log pi) - (ref - log pi) - 1."""
    model = init_model(cfg, seed=3)
    batch = make_batch(model, seed=3)
    rng = np.random.default_rng(4)
    batch["ref_logprobs"] = (batch["old_logprobs"] + rng.normal(0, 0.2, (B, T))).astype(np.float32) * batch["loss_mask"]
    opts = update.UpdateOptions(objective="cispo", objective_options={"eps_high": EPS_HIGH, "kl_coef": 0.5})
    ps = update.PolicyState(model, grad_recorder(), one_device(), opts, optax.constant_schedule(0.0), with_ref=True,
                            compiler_options=FAST_COMPILE)
    m = ps.update(batch)
    tokens = jnp.asarray(batch["tokens"])
    logp = jnp.take_along_axis(jax.nn.log_softmax(model.forward(tokens).logits[:, :-1].astype(jnp.float32)),
                               tokens[:, 1:, None], -1)[..., 0]
    mask = batch["loss_mask"][:, 1:]
    d = jnp.asarray(batch["ref_logprobs"])[:, 1:] - logp
    k3 = float(jnp.sum((jnp.exp(d) - d - 1.0) * mask) / mask.sum())
    assert k3 > 1e-3
    np.testing.assert_allclose(float(m["loss"]), float(cispo_by_hand(model, batch)) + 0.5 * k3, rtol=1e-5)
    np.testing.assert_allclose(float(m["ref_kl"]), k3, rtol=1e-5)
