"""Mixture of experts: dense (reference) and the two grouped matmul paths (ragged, chunked) on uneven
routing, all against a per-token numpy oracle; the chunked grouped matmul on its own edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import m1_jax
from m1_jax.layers.expert_chunks import chunk_rows, swiglu_chunked
from m1_jax.layers.experts import grouped_impl, sort_by_expert, swiglu_grouped
from m1_jax.layers.moe import MoE, route
from pallas_kernels.platform import tpu_target
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


GROUPED_IMPLS = ("ragged", "chunked")


def test_dense_and_grouped_outputs_match_oracle(skewed):
    moe, x = skewed
    ref = _numpy_moe(moe, x)
    yd, _, auxd = moe(x, impl="dense")
    for impl in ("dense",) + GROUPED_IMPLS:
        y, logits, aux = moe(x, impl=impl)
        assert y.shape == x.shape and logits.shape == (2, 19, E)
        _close(np.asarray(y).reshape(-1, D), ref, f"{impl} output vs numpy")
        _close(y, yd, f"{impl} vs dense output")
        assert float(auxd) == float(aux)


@pytest.mark.parametrize("impl", GROUPED_IMPLS)
def test_dense_and_grouped_gradients_match(skewed, impl):
    moe, x = skewed
    gmd, gxd = nnx.grad(_loss, argnums=(0, 1))(moe, x, "dense")
    gmr, gxr = nnx.grad(_loss, argnums=(0, 1))(moe, x, impl)
    _close(gxr, gxd, "d/dx")
    for name in ("w1", "w3", "w2", "gate"):
        _close(getattr(gmr, name)[...], getattr(gmd, name)[...], f"d/d{name}")
    # Expert 5 received no token: its gradient is exactly zero on both paths; expert 0's is not.
    for g in (gmd, gmr):
        assert not np.asarray(g.w1[...])[E - 1].any() and np.asarray(g.w1[...])[0].any()


def test_fewer_rows_than_experts_gather_each_rows_expert(skewed):
    """Two tokens x top-2 = 4 rows < 6 experts: the chunked path gathers each row's expert
    (experts_gathered); values and gradients equal the dense reference."""
    moe, x = skewed
    x = x[:1, 3:5]
    _close(moe(x, impl="chunked")[0], moe(x, impl="dense")[0], "gathered vs dense output")
    _close(moe(x, impl="chunked")[0], _numpy_moe(moe, x).reshape(x.shape), "gathered vs numpy")
    gmd, gxd = nnx.grad(_loss, argnums=(0, 1))(moe, x, "dense")
    gmc, gxc = nnx.grad(_loss, argnums=(0, 1))(moe, x, "chunked")
    _close(gxc, gxd, "d/dx")
    for name in ("w1", "w3", "w2", "gate"):
        _close(getattr(gmc, name)[...], getattr(gmd, name)[...], f"d/d{name}")


def test_auto_picks_ragged_for_tpu_and_chunked_elsewhere(skewed):
    moe, x = skewed
    assert grouped_impl() == "chunked"  # the tests run on CPU
    with tpu_target():
        assert grouped_impl() == "ragged"
    _close(moe(x)[0], moe(x, impl="chunked")[0], "auto vs chunked")  # the default is auto
    assert moe.impl == "auto"


def _sorted_rows(seed, rows_per_expert):
    """Rows sorted into runs of the given sizes (the trailing rows, past the runs, are padding)."""
    k = jax.random.split(jax.random.key(seed), 4)
    m = sum(rows_per_expert) + 3
    e = len(rows_per_expert)
    rows = jax.random.normal(k[0], (m, D))
    w1, w3 = jax.random.normal(k[1], (e, D, I)) * 0.2, jax.random.normal(k[2], (e, D, I)) * 0.2
    w2 = jax.random.normal(k[3], (e, I, D)) * 0.2
    return rows, jnp.asarray(rows_per_expert, jnp.int32), w1, w3, w2


@pytest.mark.parametrize("chunk", [8, 16, 64])
def test_chunked_matches_ragged_dot_on_any_chunking(chunk):
    """Runs shorter than, equal to and spanning several chunks, an empty run, rows past all runs (zeros),
    and a chunk larger than everything: values and all four gradients equal ragged_dot's."""
    rows, sizes, w1, w3, w2 = _sorted_rows(chunk, [16, 0, 37, 3, 9])
    got = swiglu_chunked(rows, sizes, w1, w3, w2, chunk)
    want = swiglu_grouped(rows, sizes, w1, w3, w2, jnp.float32, "ragged")
    _close(got, want, "chunked vs ragged_dot")
    assert not np.asarray(got)[int(sizes.sum()):].any()

    def loss(fn):
        return lambda r, a, b, c: jnp.sum(jnp.tanh(fn(r, a, b, c)) * jnp.arange(D, dtype=jnp.float32))

    g = jax.grad(loss(lambda r, a, b, c: swiglu_chunked(r, sizes, a, b, c, chunk)), argnums=(0, 1, 2, 3))
    gr = jax.grad(loss(lambda r, a, b, c: swiglu_grouped(r, sizes, a, b, c, jnp.float32, "ragged")),
                  argnums=(0, 1, 2, 3))
    for name, a, b in zip(("rows", "w1", "w3", "w2"), g(rows, w1, w3, w2), gr(rows, w1, w3, w2)):
        _close(a, b, f"d/d{name}")
        if name != "rows":
            assert not np.asarray(a)[1].any()  # the empty run's expert gets no gradient


def test_chunk_rows_follows_the_average_run():
    assert chunk_rows(2, 8) == 8  # one token decoding: the smallest chunk
    assert chunk_rows(4096, 8) == 128 and chunk_rows(8192, 32) == 128  # capped
    assert chunk_rows(600, 8) == 128 and chunk_rows(300, 8) == 64


def test_chunked_runs_in_bfloat16():
    rows, sizes, w1, w3, w2 = _sorted_rows(3, [5, 20, 11])
    got = swiglu_grouped(rows, sizes, w1, w3, w2, jnp.bfloat16, "chunked")
    want = swiglu_grouped(rows, sizes, w1, w3, w2, jnp.float32, "ragged")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=0.05 * float(jnp.abs(want).max()))


def test_sort_by_expert_groups_rows_in_expert_order():
    x = jnp.arange(5 * D, dtype=jnp.float32).reshape(5, D)
    experts = jnp.asarray([[2, 0], [1, 2], [0, 1], [2, 1], [0, 2]])
    rows, counts, order = sort_by_expert(x, experts, 3, jnp.float32)
    assert counts.tolist() == [3, 3, 4]
    assert (np.asarray(experts).reshape(-1)[np.asarray(order)] == np.repeat([0, 1, 2], [3, 3, 4])).all()
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(x)[np.asarray(order) // 2])


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
