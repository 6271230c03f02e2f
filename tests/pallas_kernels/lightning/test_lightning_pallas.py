"""Pallas kernels (interpret mode on CPU) against the token-recurrence reference."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.lightning import lightning_attention, lightning_decode_step
from pallas_kernels.lightning.pallas_tpu import lightning_pallas

NAMES = ("o", "state", "dq", "dk", "dv", "ds0")

CASES = [  # (time, segment_ids, initial_state); block 16 (shared with the xla tests)
    (37, True, True),
    (48, False, True),
    (48, True, False),
    (1, True, True),
]


@pytest.mark.parametrize("t,use_seg,use_init", CASES)
def test_pallas_matches_reference_f32(lt, t, use_seg, use_init):
    args, ref = lt.case(t, use_seg, use_init)
    got = lt.fwd_and_grads("pallas", *args, 16)
    for name, a, r in zip(NAMES, got, ref):
        assert lt.rel_err(a, r) < 1e-5, name


@pytest.mark.parametrize("layout,head_tile", [("packed", 2)])
def test_pallas_layouts_and_head_tiles(lt, layout, head_tile):
    # the default tests use the head-major layout with one head per grid step
    b, t, h, d = 1, 24, 4, 8
    q, k, v, s0, do, ds = lt.make_inputs(31 + head_tile, b, t, h, d)
    seg = lt.packed_segments(b, t, 5)
    slopes = jnp.asarray(lt.SLOPES[:h])

    def f(impl_fn):
        def run(q, k, v, s0):
            (o, st), vjp = jax.vjp(impl_fn, q, k, v, s0)
            return (o, st) + tuple(vjp((do, ds)))

        return jax.jit(run)(q, k, v, s0)

    ref = f(
        lambda q, k, v, s0: lightning_attention(q, k, v, slopes, initial_state=s0, segment_ids=seg, impl="reference")
    )
    got = f(
        lambda q, k, v, s0: lightning_pallas(
            q, k, v, slopes, s0, seg, 16, interpret=True, layout=layout, head_tile=head_tile
        )
    )
    for name, a, r in zip(NAMES, got, ref):
        assert lt.rel_err(a, r) < 1e-5, name


def test_pallas_bf16(lt):
    args, ref = lt.case(37, True, True, dtype=jnp.bfloat16)
    got = lt.fwd_and_grads("pallas", *args, 16)
    assert got[0].dtype == jnp.bfloat16 and got[2].dtype == jnp.bfloat16
    for name, a, r in zip(NAMES, got, ref):
        assert lt.rel_err(a.astype(jnp.float32), r.astype(jnp.float32)) < 1e-2, name


def test_pallas_overflow_and_long_sequence(lt):
    # s * block = 0.917 * 256 = 235 (exp(+235) overflows float32) next to s = 5e-5
    # over 4096 tokens (the state grows almost without decay).
    args, ref = lt.long_case()
    got = lt.fwd_and_grads("pallas", *args, 256)
    for name, a, r in zip(NAMES, got, ref):
        assert lt.rel_err(a, r) < 1e-5, name


def test_pallas_prefill_then_decode(lt):
    b, t, n, h, d = 1, 29, 21, 2, 8
    q, k, v, s0, _, _ = lt.make_inputs(43, b, t, h, d)
    slopes = jnp.asarray(lt.SLOPES[[1, 9]])
    o_all, s_all = lightning_attention(q, k, v, slopes, initial_state=s0, block_size=8, impl="pallas")
    o_pre, state = lightning_attention(
        q[:, :n], k[:, :n], v[:, :n], slopes, initial_state=s0, block_size=8, impl="pallas"
    )
    outs = [o_pre]
    for i in range(n, t):
        o_i, state = lightning_decode_step(state, q[:, i], k[:, i], v[:, i], slopes)
        outs.append(o_i[:, None])
    assert lt.rel_err(jnp.concatenate(outs, axis=1), o_all) < 1e-5
    assert lt.rel_err(state, s_all) < 1e-5


def test_pallas_tpu_block_rule():
    q = jnp.ones((1, 8, 1, 128))
    with pytest.raises(ValueError, match="multiple of 128"):
        lightning_pallas(q, q, q, jnp.ones((1,)), jnp.zeros((1, 1, 128, 128)), None, 64, interpret=False)
