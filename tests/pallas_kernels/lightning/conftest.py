"""Shared helpers for the lightning attention tests (the ``lt`` fixture)."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning import lightning_attention, m1_slopes

# M1's real slopes: heads 0, 7, 31, 63 of 64 at layer 0 and 78 of 80, plus a
# tiny 4-head model (layer 1 of 4): 12 heads side by side in one call.
SLOPES = np.concatenate(
    [
        m1_slopes(64, 0, 80)[[0, 7, 31, 63]],
        m1_slopes(64, 78, 80)[[0, 7, 31, 63]],
        m1_slopes(4, 1, 4),
    ]
).astype(np.float32)


# what fwd_and_grads returns, in order
NAMES = ("o", "state", "dq", "dk", "dv", "ds0")


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite values"
    scale = np.max(np.abs(b))
    if scale == 0:  # e.g. gradients through an all-padding row: must be exactly 0
        return float(np.max(np.abs(a)))
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def make_inputs(seed, b, t, h, d, dtype=jnp.float32, dv=None):
    rng = np.random.default_rng(seed)
    dv = d if dv is None else dv

    def rnd(*shape):
        x = rng.uniform(0.1, 1.0, shape) * rng.choice([-1.0, 1.0], shape)  # no zeros
        return jnp.asarray(x, jnp.float32)

    q, k = rnd(b, t, h, d).astype(dtype), rnd(b, t, h, d).astype(dtype)
    v = rnd(b, t, h, dv).astype(dtype)
    s0 = rnd(b, h, d, dv)
    do = rnd(b, t, h, dv)
    ds = rnd(b, h, d, dv)
    return q, k, v, s0, do, ds


def packed_segments(b, t, seed):
    """Segment ids with padding at both ends, between and inside segments, several segments."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        pos, sid = int(rng.integers(0, 4)), 1
        while pos < t:
            n = int(rng.integers(1, 12))
            seg[r, pos : pos + n] = sid
            pos += n
            if rng.random() < 0.3:
                pos += int(rng.integers(1, 3))  # a padding gap (inside a segment when sid stays)
            if rng.random() < 0.75:
                sid += 1
        if t > 6:
            seg[r, -int(rng.integers(1, 4)) :] = 0  # trailing padding
    return jnp.asarray(seg)


def fwd_and_grads(impl, q, k, v, slopes, s0, seg, do, ds, block_size, **kw):
    """(o, final_state, dq, dk, dv, ds0) through jax.vjp with cotangents (do, ds)."""

    def f(q, k, v, s0):
        return lightning_attention(
            q, k, v, slopes, initial_state=s0, segment_ids=seg, block_size=block_size, impl=impl, **kw
        )

    def run(q, k, v, s0):
        (o, st), vjp = jax.vjp(f, q, k, v, s0)
        return (o, st) + tuple(vjp((do.astype(o.dtype), ds)))

    return jax.jit(run)(q, k, v, s0)


_REF_CACHE = {}


def case(t, use_seg, use_init, dtype=jnp.float32, b=2, d=8, block_size=16):
    """Inputs (q, k, v, slopes, s0, seg, do, ds) of a standard case and the reference
    results (memoised so the chunked and Pallas tests share one reference run)."""
    key = (t, use_seg, use_init, jnp.dtype(dtype).name, b, d, block_size)
    if key not in _REF_CACHE:
        seed = 1000 + 10 * t + 2 * use_seg + use_init + 7 * (dtype != jnp.float32)
        h = len(SLOPES)
        q, k, v, s0, do, ds = make_inputs(seed, b, t, h, d, dtype=dtype)
        if not use_init:
            s0 = jnp.zeros_like(s0)
        seg = packed_segments(b, t, seed) if use_seg else None
        args = (q, k, v, jnp.asarray(SLOPES), s0, seg, do, ds)
        ref = fwd_and_grads("reference", *args, block_size)
        _REF_CACHE[key] = (args, ref)
    return _REF_CACHE[key]


def long_case():
    """s * block = 0.917 * 256 = 235 (exp(+235) overflows float32) beside M1's last
    lightning layers' s ~ 5e-5 over 4096 tokens (the state grows almost without
    decay); block 256. Returns (args, reference results), memoised."""
    key = "long"
    if key not in _REF_CACHE:
        q, k, v, s0, do, ds = make_inputs(12, 1, 4096, 2, 8)
        slopes = jnp.asarray([0.91701323, 4.9485e-05], jnp.float32)
        args = (q, k, v, slopes, s0, None, do, ds)
        _REF_CACHE[key] = (args, fwd_and_grads("reference", *args, 256))
    return _REF_CACHE[key]


@pytest.fixture
def lt():
    """This module: SLOPES, NAMES, rel_err, make_inputs, case, long_case, packed_segments, fwd_and_grads."""
    return sys.modules[__name__]
