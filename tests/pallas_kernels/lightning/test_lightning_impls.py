"""The chunked XLA path and the Pallas kernels (interpret mode off TPU) against the token-recurrence
reference: one set of cases, parametrised over the implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning import lightning_attention, lightning_decode_step

IMPLS = ("xla", "pallas")

SHARED_CASES = [  # (time, segment_ids, initial_state); block 16
    (37, True, True),
    (48, False, True),
    (48, True, False),
    (1, True, True),
]
XLA_CASES = [  # cheap on the chunked path, slow in the Pallas interpreter
    (37, False, False),
    (1, False, True),
]
F32_CASES = [(impl, *c) for impl in IMPLS for c in SHARED_CASES] + [("xla", *c) for c in XLA_CASES]


@pytest.mark.parametrize("impl,t,use_seg,use_init", F32_CASES)
def test_matches_reference_f32(lt, impl, t, use_seg, use_init):
    args, ref = lt.case(t, use_seg, use_init)
    got = lt.fwd_and_grads(impl, *args, 16)
    for name, a, r in zip(lt.NAMES, got, ref):
        assert lt.rel_err(a, r) < 1e-5, name


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16(lt, impl):
    args, ref = lt.case(37, True, True, dtype=jnp.bfloat16)
    got = lt.fwd_and_grads(impl, *args, 16)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32 and got[2].dtype == jnp.bfloat16
    for name, a, r in zip(lt.NAMES, got, ref):
        assert lt.rel_err(a.astype(jnp.float32), r.astype(jnp.float32)) < 1e-2, name


@pytest.mark.parametrize("impl", IMPLS)
def test_overflow_and_long_sequence(lt, impl):
    # s * block = 0.917 * 256 = 235 (exp(+235) overflows float32) next to M1's last
    # lightning layers' s ~ 5e-5, where the state grows over thousands of tokens.
    args, ref = lt.long_case()
    got = lt.fwd_and_grads(impl, *args, 256)
    s0 = args[4]
    assert float(jnp.max(jnp.abs(got[1][:, 1]))) > 50 * float(jnp.max(jnp.abs(s0)))  # it grew
    for name, a, r in zip(lt.NAMES, got, ref):
        assert lt.rel_err(a, r) < 1e-5, name


@pytest.mark.parametrize("impl,dtype,use_init", [
    ("xla", jnp.float32, False),
    ("xla", jnp.bfloat16, False),
    ("pallas", jnp.float32, True),
])
def test_prefill_then_decode_equals_one_call(lt, impl, dtype, use_init):
    b, t, n, h, d = 2, 23, 17, 3, 8
    q, k, v, s0, _, _ = lt.make_inputs(21, b, t, h, d, dtype=dtype)
    s0 = s0 if use_init else None
    slopes = jnp.asarray(lt.SLOPES[[0, 4, 11]])
    o_all, s_all = lightning_attention(q, k, v, slopes, initial_state=s0, block_size=8, impl=impl)
    o_pre, state = lightning_attention(
        q[:, :n], k[:, :n], v[:, :n], slopes, initial_state=s0, block_size=8, impl=impl
    )
    outs = [o_pre]
    step = jax.jit(lightning_decode_step)
    for i in range(n, t):
        o_i, state = step(state, q[:, i], k[:, i], v[:, i], slopes)
        assert o_i.dtype == dtype and state.dtype == jnp.float32
        outs.append(o_i[:, None])
    o_cat = jnp.concatenate(outs, axis=1).astype(jnp.float32)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert lt.rel_err(o_cat, o_all.astype(jnp.float32)) < tol
    assert lt.rel_err(state, s_all) < 1e-5


def test_xla_no_initial_state_equals_zeros(lt):
    q, k, v, _, _, _ = lt.make_inputs(5, 1, 21, 3, 4)
    slopes = jnp.asarray(lt.SLOPES[:3])
    a = lightning_attention(q, k, v, slopes, block_size=8, impl="xla")
    b = lightning_attention(q, k, v, slopes, initial_state=jnp.zeros((1, 3, 4, 4)), block_size=8, impl="xla")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_xla_different_value_dim(lt):
    q, k, v, _, _, _ = lt.make_inputs(8, 1, 19, 2, 4, dv=6)
    s0 = jnp.ones((1, 2, 4, 6)) * 0.3
    slopes = jnp.asarray(lt.SLOPES[:2])
    r = lightning_attention(q, k, v, slopes, initial_state=s0, impl="reference")
    x = lightning_attention(q, k, v, slopes, initial_state=s0, block_size=8, impl="xla")
    assert x[0].shape == (1, 19, 2, 6) and x[1].shape == (1, 2, 4, 6)
    assert lt.rel_err(x[0], r[0]) < 1e-5 and lt.rel_err(x[1], r[1]) < 1e-5


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_padding_is_skipped(lt, impl):
    """Left/right padding and a mid-segment gap leave real tokens' results unchanged."""
    t = 13
    q, k, v, s0, _, _ = lt.make_inputs(13, 1, t, 2, 4)
    slopes = jnp.asarray(lt.SLOPES[[0, 5]])
    base_o, base_s = lightning_attention(q, k, v, slopes, initial_state=s0, block_size=4, impl="reference")
    tp = t + 7  # padding at 0-2 (left), 8 and 12 (inside the segment), 18-19 (right)
    real_idx = np.array([i for i in range(tp) if i not in (0, 1, 2, 8, 12, 18, 19)])
    rng = np.random.default_rng(3)

    def scatter(x):
        full = jnp.asarray(rng.uniform(0.5, 1.0, (1, tp) + x.shape[2:]), x.dtype)
        return full.at[:, real_idx].set(x)

    seg = np.zeros((1, tp), np.int32)
    seg[0, real_idx] = 7
    o, s = lightning_attention(
        scatter(q),
        scatter(k),
        scatter(v),
        slopes,
        initial_state=s0,
        segment_ids=jnp.asarray(seg),
        block_size=4,
        impl=impl,
    )
    assert lt.rel_err(o[:, real_idx], base_o) < 1e-5
    assert lt.rel_err(s, base_s) < 1e-5
    pad = np.setdiff1d(np.arange(tp), real_idx)
    assert float(jnp.max(jnp.abs(o[:, pad]))) == 0.0


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_segments_reset_and_all_padding(lt, impl):
    q, k, v, s0, _, _ = lt.make_inputs(14, 2, 10, 1, 4)
    slopes = jnp.asarray(lt.SLOPES[:1])
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0, 0, 0], [0] * 10])
    o, s = lightning_attention(q, k, v, slopes, initial_state=s0, segment_ids=seg, block_size=4, impl=impl)
    # row 0, segment 2 starts from zero state (initial_state dropped)
    o2, s2 = lightning_attention(q[:1, 3:7], k[:1, 3:7], v[:1, 3:7], slopes, block_size=4, impl="reference")
    assert lt.rel_err(o[:1, 3:7], o2) < 1e-5 and lt.rel_err(s[:1], s2) < 1e-5
    # row 1 is all padding: outputs 0 and the state passes through untouched
    assert float(jnp.max(jnp.abs(o[1]))) == 0.0
    np.testing.assert_array_equal(s[1], s0[1])
