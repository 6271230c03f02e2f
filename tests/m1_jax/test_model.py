"""M1Model as a whole: scanned vs unrolled layer stacks, abstract (weightless) full-size model,
bf16 compute on the golden checkpoint."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import m1_jax
from m1_jax.config import FULL, LINEAR
from tiny_models import tiny_config
from trace_counter import count_traces

SCAN_ATOL = 1e-6


@pytest.fixture(scope="module")
def tiny_cfg():
    # Period of 2, two periods: the unrolled loop must pick each period's own weights and slopes.
    return tiny_config(layer_types=(LINEAR, FULL) * 2, block_size=5, initializer_range=0.1)


@pytest.fixture(scope="module")
def tiny_ids(tiny_cfg):
    return jax.random.randint(jax.random.key(7), (2, 23), 0, tiny_cfg.vocab_size)


def test_calling_the_model_runs_it_compiled_once_per_shape(tiny_cfg, tiny_ids):
    """``model(ids)`` compiles on the first call of a shape and reuses it; under a transformation it is traced."""
    model = m1_jax.init_model(tiny_cfg, seed=3)
    with count_traces() as traces:
        first = model(tiny_ids)
        again = model(tiny_ids)
    assert traces["_compiled_logits"] == 1
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    with count_traces() as traces:
        model(tiny_ids[:, :9])  # a new shape: one more compile
        model(tiny_ids[:, :9])
    assert traces["_compiled_logits"] == 1
    # inside jax.jit / nnx.grad the call is part of the caller's program: the plain forward's logits
    traced = nnx.jit(lambda m, ids: m(ids))(model, tiny_ids)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(first), rtol=0, atol=1e-5)
    grads = nnx.jit(nnx.grad(lambda m: m(tiny_ids).mean()))(model)
    assert np.isfinite(np.asarray(grads.lm_head[...])).all()


def test_scanned_and_unrolled_stacks_agree(tiny_cfg, tiny_ids):
    assert tiny_cfg.num_periods == 2
    model = m1_jax.init_model(tiny_cfg, seed=3)
    forward = nnx.jit(lambda m, ids, scan: m.forward(ids, collect=True, scan=scan), static_argnums=2)
    a, b = forward(model, tiny_ids, True), forward(model, tiny_ids, False)
    assert np.abs(np.asarray(a.logits)).max() > 0.5  # not vacuously small
    # Both compiled the same way (nnx.jit): measured max |diff| 0.0 on this machine.
    np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), rtol=0, atol=SCAN_ATOL)
    np.testing.assert_allclose(np.asarray(a.layer_outputs), np.asarray(b.layer_outputs), rtol=0, atol=SCAN_ATOL)
    np.testing.assert_allclose(np.asarray(a.aux_loss_per_layer), np.asarray(b.aux_loss_per_layer),
                               rtol=0, atol=SCAN_ATOL)
    # (Eagerly, scan=True runs as one compiled scan and scan=False op by op, so XLA fuses them differently:
    # measured 9.5e-7 on logits of magnitude 3.2 here, 1.1e-6 with six layers. Compiled the same way they
    # agree exactly.)


@pytest.fixture(scope="module")
def remat_grad(tiny_cfg, tiny_ids):
    """(model, its jitted loss and gradients with ``remat`` static, those without remat): each remat policy's
    test compares against the one computation without it."""
    model = m1_jax.init_model(tiny_cfg, seed=5)

    def loss(m, ids, remat):
        out = m.forward(ids, remat=remat)
        return jnp.mean(jax.nn.logsumexp(out.logits, axis=-1) - out.logits[..., 0]) + out.aux_loss

    grad = nnx.jit(nnx.value_and_grad(loss), static_argnums=2)
    return model, grad, grad(model, tiny_ids, "none")


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients(remat_grad, tiny_ids, remat):
    """Rematerialising each layer period changes memory, not the loss or the gradients."""
    model, grad, (l0, g0) = remat_grad
    l1, g1 = grad(model, tiny_ids, remat)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    flat0, flat1 = jax.tree.leaves(nnx.state(g0)), jax.tree.leaves(nnx.state(g1))
    assert len(flat0) == len(flat1) > 10
    for a, b in zip(flat0, flat1):
        scale = max(float(np.abs(np.asarray(a)).max()), 1e-30)
        assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= 1e-5 * scale


def test_abstract_full_size_model_allocates_nothing(configs_dir):
    """eval_shape of M1-40k in a fresh process: under a minute, ShapeDtypeStruct leaves only, the published
    parameter count, the release's byte size in bf16 (router gates fp32), and a small RSS growth."""
    code = textwrap.dedent(f"""
        import json, resource, time
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        import m1_jax
        cfg = m1_jax.M1Config.from_json({str(configs_dir / "minimax-m1-40k.json")!r})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        model = m1_jax.abstract_model(cfg, param_dtype=jnp.bfloat16)
        seconds = time.perf_counter() - t0
        growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        leaves = jax.tree.leaves(nnx.state(model))
        params = jax.tree.leaves(nnx.state(model, nnx.Param))
        print(json.dumps(dict(
            seconds=seconds, growth_kib=growth_kib,
            all_shape_structs=all(type(l) is jax.ShapeDtypeStruct for l in leaves),
            n_params=sum(int(np.prod(l.shape)) for l in params),
            n_bytes=sum(int(np.prod(l.shape)) * l.dtype.itemsize for l in params),
            layers_axis=sorted({{l.shape[0] for l in params if l.ndim >= 2 and l.shape[0] == cfg.num_periods}}),
        )))
    """)
    env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    cfg = m1_jax.M1Config.from_json(configs_dir / "minimax-m1-40k.json")
    assert r["seconds"] < 60, r
    assert r["all_shape_structs"], r
    assert r["n_params"] == m1_jax.param_counts(cfg)["total"] == 456_089_655_296
    # The release's index total_size (docs/model.md §3.4): bf16 everywhere except the fp32 router gates.
    assert r["n_bytes"] == 912_210_767_872
    assert r["layers_axis"] == [cfg.num_periods] == [10]  # scanned over 10 periods of 8
    assert r["growth_kib"] < 1024 * 1024, r  # < 1 GiB (measured ~2 MiB); the weights would be 912 GB


def test_bf16_compute_on_golden(golden_dir):
    """The fp32 caseA weights loaded as bf16 and run in bf16 stay close to the fp32 oracle.

    bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op); across 4 layers with the
    alpha = 3.56 DeepNorm residual the measured relative L2 error of the logits is 1.1e-2, max |diff| 0.18
    on logits of range 11.4, and the argmax agrees on 72 of 74 positions (the two others have fp32
    top-1 margins 0.04 and 0.005). Bounds: about 2-3x those measurements, so a real precision bug
    (an fp32 statistic computed in bf16, an overflowing decay) fails while rounding does not.
    """
    ids = np.load(golden_dir / "inputs.npz")["input_ids"]
    ref = np.load(golden_dir / "outputs.npz")["logits"]
    model = m1_jax.from_pretrained(golden_dir, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    assert model.periods.layers[0].self_attn.qkv_proj[...].dtype == jnp.bfloat16
    assert model.periods.layers[0].block_sparse_moe.gate[...].dtype == jnp.float32  # router stays fp32
    logits = np.asarray(model(jnp.asarray(ids)))
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    err = logits - ref
    assert np.linalg.norm(err) / np.linalg.norm(ref) < 3e-2
    assert np.abs(err).max() < 0.5
    agree = logits.argmax(-1) == ref.argmax(-1)
    assert agree.mean() >= 0.9, agree.mean()
    top2 = np.sort(ref, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 2 * 0.5  # a clear fp32 decision cannot flip within the bound
    assert agree[clear].all()


def test_float32_head_on_bf16_compute(tiny_cfg, tiny_ids):
    """``head_dtype=jnp.float32`` on a bf16 model: the final norm runs in float32 on the last layer's (bf16)
    output and the logits are its float32 product with the float32 head weight; the default rounds the norm's
    output and the head weight to bf16 first. The layers below the head are the same either way."""
    models = {hd: m1_jax.init_model(tiny_cfg, seed=3, dtype=jnp.bfloat16, head_dtype=hd)
              for hd in (None, jnp.float32)}
    forward = nnx.jit(lambda m, ids: m.forward(ids, collect=True))
    outs = {hd: forward(m, tiny_ids) for hd, m in models.items()}
    np.testing.assert_array_equal(np.asarray(outs[None].layer_outputs), np.asarray(outs[jnp.float32].layer_outputs))
    model = models[jnp.float32]
    x = np.asarray(outs[jnp.float32].layer_outputs[-1]).astype(np.float64)
    assert outs[jnp.float32].layer_outputs.dtype == jnp.bfloat16
    weight = np.asarray(model.norm.weight[...]).astype(np.float64)
    z32 = weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + tiny_cfg.rms_norm_eps)
    z16 = np.asarray(model.norm(outs[None].layer_outputs[-1]))  # the default: the norm computed in bf16
    assert z16.dtype == jnp.bfloat16
    w = np.asarray(model.lm_head[...])
    assert w.dtype == np.float32
    fp32_head = z32 @ w.astype(np.float64)
    bf16_head = z16.astype(np.float64) @ w.astype(jnp.bfloat16).astype(np.float64)
    got = {hd: np.asarray(o.logits) for hd, o in outs.items()}
    assert got[jnp.float32].dtype == got[None].dtype == np.float32
    # float32 sums of 64 products against float64: measured 9e-7; the bf16 rounding moves the logits by up to
    # ~1e-2 (logits up to 3.2)
    np.testing.assert_allclose(got[jnp.float32], fp32_head, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[None], bf16_head, rtol=0, atol=1e-5)
    assert np.abs(got[None] - got[jnp.float32]).max() > 1e-4


def test_head_dtype_of_the_run_config(tiny_cfg, tiny_ids):
    """``model.head_dtype`` of a run config: "auto" is the compute dtype (the model unchanged), the others name
    the head's dtype; a float32 head on a float32 model gives the default's logits."""
    from m1_jax.run_config import CHOICES, RunConfig
    from m1_jax.train import model_options

    run = RunConfig()
    logits = {}
    for choice in CHOICES["model.head_dtype"]:
        run.model.head_dtype = choice
        model = m1_jax.init_model(tiny_cfg, seed=3, **model_options(run))
        assert model.head_dtype == (None if choice == "auto" else jnp.dtype(choice))
        logits[choice] = np.asarray(model(tiny_ids))
    np.testing.assert_array_equal(logits["float32"], logits["auto"])
    assert np.abs(logits["bfloat16"] - logits["auto"]).max() > 1e-4
    with pytest.raises(ValueError, match="head_dtype must be None .* or a floating dtype.*got 'int8'"):
        m1_jax.init_model(tiny_cfg, head_dtype="int8")
