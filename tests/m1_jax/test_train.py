"""Train step: sharded == one device, gradient accumulation == full batch, NaN guard, weight-decay mask,
and the `m1 train` CLI's run-config handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import tiny_config

from m1_jax import sharding, train
from m1_jax.config import FULL, LINEAR
from m1_jax.model import init_model
from m1_jax.run_config import RunConfig, RunConfigError, load_run_config, parse_override

B, T = 8, 32


def small_run(**train_kw) -> RunConfig:
    run = RunConfig()
    run.train.steps = 10
    run.optimizer.warmup_steps = 2
    run.data.batch_size, run.data.seq_len = B, T
    run.train.fast_compile = True  # tiny shapes: compile time dominates
    # Adam's first update is lr * g / (|g| + eps): with eps 1e-8 a gradient entry of ~1e-10 (rounding noise)
    # moves a weight by up to lr in either direction; 1e-4 keeps parameter comparisons well-conditioned.
    run.optimizer.eps = 1e-4
    for k, v in train_kw.items():
        run.set(k, v)
    return run


def packed_batches(n: int, seed: int = 0) -> list[dict]:
    """Random token rows, each packed with two documents (segment ids 1, 2, positions restarting)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cut = rng.integers(5, T - 5, size=B)
        idx = np.arange(T)[None]
        seg = np.where(idx < cut[:, None], 1, 2)
        pos = np.where(idx < cut[:, None], idx, idx - cut[:, None])
        out.append({"inputs": rng.integers(0, 512, (B, T)), "targets": rng.integers(0, 512, (B, T)),
                    "loss_mask": rng.random((B, T)) > 0.1, "segment_ids": seg, "positions": pos})
    return out


def run_steps(ts, batches):
    return [float(ts.train_step(ts.global_batch(b))["loss"]) for b in batches]


def flat_params(ts):
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(ts.params())}


@pytest.fixture(scope="module")
def cfg():
    return tiny_config(layer_types=[LINEAR, FULL])  # one lightning and one softmax layer: half the tiny's compile


def test_mesh_matches_single_device(cfg):
    run = small_run()
    batches = packed_batches(1) * 3  # the same batch thrice: the loss must fall
    one = train.build_train_state(cfg, run, sharding.make_mesh("data=1", jax.devices()[:1]))
    ref = run_steps(one, batches)
    mesh = sharding.make_mesh("data=1,fsdp=2,expert=2,tensor=2")
    sharded = train.build_train_state(cfg, run, mesh)
    got = run_steps(sharded, batches)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert ref[-1] < ref[0]
    a, b = flat_params(one), flat_params(sharded)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=str(k))


def test_train_state_leaves_the_callers_model_alone(cfg):
    """The train state places a copy of the model on its mesh; the caller's model keeps its own mesh."""
    model = init_model(cfg, seed=0)
    ts = train.build_train_state(cfg, small_run(), sharding.make_mesh("data=2,fsdp=2,expert=2"), model=model)
    assert model.mesh is None and ts.model().mesh is not None


def test_gradient_accumulation_matches_full_batch(cfg):
    # The load-balancing loss is a product of per-batch means, computed per micro-batch: not additive.
    cfg = cfg.replace(router_aux_loss_coef=0.0)
    batches = packed_batches(2, seed=1)
    one = sharding.make_mesh("data=1", jax.devices()[:1])
    full = train.build_train_state(cfg, small_run(), one)
    acc = train.build_train_state(cfg, small_run(**{"data.micro_batches": 4}), one)
    np.testing.assert_allclose(run_steps(acc, batches), run_steps(full, batches), rtol=1e-6)
    a, b = flat_params(full), flat_params(acc)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=str(k))


def test_non_finite_loss_leaves_state_unchanged(cfg):
    ts = train.build_train_state(cfg, small_run(), sharding.make_mesh("data=1", jax.devices()[:1]))
    model = ts.model()
    model.lm_head[...] = model.lm_head[...].at[0, 0].set(jnp.nan)
    ts.state = nnx.state((model, nnx.merge(ts.graphdef, ts.state)[1]))
    before = jax.tree.map(np.asarray, ts.state)
    m = ts.train_step(ts.global_batch(packed_batches(1)[0]))
    assert int(m["ok"]) == 0 and not np.isfinite(float(m["loss"]))
    after = jax.tree.map(np.asarray, ts.state)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), after, before)
    assert ts.step == 0


def test_loss_matches_manual_cross_entropy(cfg):
    model = nnx.merge(*nnx.split(train.build_train_state(
        cfg, small_run(), sharding.make_mesh("data=1", jax.devices()[:1])).model()))
    b = {k: jnp.asarray(v) for k, v in packed_batches(1, seed=3)[0].items()}
    g, p = nnx.split(model)
    def fwd(p, b):
        m = nnx.merge(g, p)
        return train.loss_sums(m, b), m(b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"])

    fwd = jax.jit(fwd, compiler_options=train.FAST_COMPILE)
    sums, logits = fwd(p, b)
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, np.asarray(b["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(b["loss_mask"], np.float64)
    np.testing.assert_allclose(float(sums["ce"]), (ce * mask).sum(), rtol=1e-5)
    assert float(sums["tokens"]) == mask.sum()


def test_weight_decay_mask_skips_norms(cfg):
    ts = train.build_train_state(cfg, small_run(), sharding.make_mesh("data=1", jax.devices()[:1]))
    leaves = jax.tree_util.tree_flatten_with_path(train.decay_mask(ts.params()))[0]
    names = {jax.tree_util.keystr(path): bool(decays) for path, decays in leaves}
    assert len(names) == len(jax.tree.leaves(ts.params()))
    for name, decays in names.items():
        assert decays == ("norm" not in name), name
    assert not names[next(n for n in names if "input_layernorm" in n)]
    assert names[next(n for n in names if "lm_head" in n)]


def test_schedule_warmup_then_cosine():
    run = small_run()
    run.optimizer.warmup_steps, run.optimizer.lr, run.optimizer.min_lr_ratio = 4, 1.0, 0.1
    s = train.learning_rate_schedule(run.optimizer, 20)
    assert float(s(0)) == 0.0 and float(s(4)) == pytest.approx(1.0)
    assert float(s(20)) == pytest.approx(0.1) and float(s(10)) < 1.0


def test_run_config_overrides_and_errors(tmp_path):
    run = load_run_config(None, ["optimizer.lr=1e-3", "train.mesh=data=8", "data.shuffle=false"])
    assert run.optimizer.lr == 1e-3 and run.train.mesh == "data=8" and run.data.shuffle is False
    assert run.model.config == "tiny"
    assert parse_override("train.steps=5") == ("train.steps", 5)
    with pytest.raises(RunConfigError, match="unknown key 'optimizer.learning_rate'"):
        load_run_config(None, ["optimizer.learning_rate=1"])
    with pytest.raises(RunConfigError, match="train.steps: expected an integer"):
        load_run_config(None, ["train.steps=1.5"])
    bad = tmp_path / "run.json"
    bad.write_text('{"optim": {}}')
    with pytest.raises(RunConfigError, match=f"{bad}: unknown section 'optim'"):
        load_run_config(bad)
