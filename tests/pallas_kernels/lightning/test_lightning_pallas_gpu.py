"""The Pallas GPU (Triton) kernels against the token-recurrence reference: in interpret mode on CPU, compiled
on a GPU backend. The cases are the TPU kernels' (test_lightning_impls.py), plus the GPU kernels' own:
state tiles, zero-padded head dims, the split forward (state pass + output pass), the decode kernel and the
lowering to Triton from a CPU host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning import lightning_attention, lightning_decode_step, resolve_impl
from pallas_kernels.lightning.pallas_gpu import decode_step_pallas_gpu, gpu_chunk, lightning_pallas_gpu
from pallas_kernels.platform import gpu_target

TRITON_CALL = "__gpu$xla.gpu.triton"


def gpu_fwd_and_grads(q, k, v, slopes, s0, seg, do, ds, block_size, **kw):
    """(o, final_state, dq, dk, dv, ds0) of the GPU kernels through jax.vjp with cotangents (do, ds)."""

    def run(q, k, v, s0):
        (o, st), vjp = jax.vjp(lambda *x: lightning_pallas_gpu(*x[:3], slopes, x[3], seg, block_size, **kw),
                               q, k, v, s0)
        return (o, st) + tuple(vjp((do.astype(o.dtype), ds)))

    return jax.jit(run)(q, k, v, s0)


@pytest.mark.parametrize("t,use_seg,use_init", [(37, True, True), (48, False, True), (48, True, False),
                                                (1, True, True)])
def test_matches_reference_f32(lt, t, use_seg, use_init):
    args, ref = lt.case(t, use_seg, use_init)  # block 16: three chunks of 16
    got = gpu_fwd_and_grads(*args, 16)
    for name, a, r in zip(lt.NAMES, got, ref):
        assert lt.rel_err(a, r) < 1e-5, name


def test_bf16_inputs_float32_state(lt):
    args, ref = lt.case(37, True, True, dtype=jnp.bfloat16)
    got = gpu_fwd_and_grads(*args, 16)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32 and got[2].dtype == jnp.bfloat16
    assert got[5].dtype == jnp.float32
    for name, a, r in zip(lt.NAMES, got, ref):
        assert lt.rel_err(a.astype(jnp.float32), r.astype(jnp.float32)) < 1e-2, name


def test_overflow_and_long_sequence(lt):
    # s * chunk = 0.917 * 64 next to s ~ 5e-5 over 4096 tokens (64 chunks of M1's block 256 rounded to 64)
    args, ref = lt.long_case()
    got = gpu_fwd_and_grads(*args, 256)
    assert float(jnp.max(jnp.abs(got[1][:, 1]))) > 50 * float(jnp.max(jnp.abs(args[4])))  # it grew
    for name, a, r in zip(lt.NAMES, got, ref):
        assert lt.rel_err(a, r) < 1e-5, name


def test_state_tiles_and_padded_head_dims(lt):
    """d_k 12 and d_v 20 are zero-padded to 16 and 32; value_tile 16 splits the state's columns over two
    programs in the forward and the dV pass."""
    b, t, h, dk, dv = 2, 29, 3, 12, 20
    q, k, _, _, do, _ = lt.make_inputs(41, b, t, h, dk, dv=dv)
    rng = np.random.default_rng(42)
    v = jnp.asarray(rng.uniform(-1, 1, (b, t, h, dv)), jnp.float32)
    s0 = jnp.asarray(rng.uniform(-1, 1, (b, h, dk, dv)), jnp.float32)
    ds = jnp.asarray(rng.uniform(-1, 1, (b, h, dk, dv)), jnp.float32)
    seg = lt.packed_segments(b, t, 43)
    slopes = jnp.asarray(lt.SLOPES[[1, 6, 10]])
    args = (q, k, v, slopes, s0, seg, do, ds)
    ref = lt.fwd_and_grads("reference", *args, 16)
    got = gpu_fwd_and_grads(*args, 16, value_tile=16)
    assert got[0].shape == (b, t, h, dv) and got[1].shape == (b, h, dk, dv)
    for name, a, r in zip(lt.NAMES, got, ref):
        assert lt.rel_err(a, r) < 1e-5, name


def split_forward(q, k, v, slopes, s0, seg, block_size, **kw):
    """(o, final_state) of the split forward, jitted."""
    return jax.jit(lambda *x: lightning_pallas_gpu(*x[:3], slopes, x[3], seg, block_size, forward="split", **kw))(
        q, k, v, s0)


@pytest.mark.parametrize("t,use_seg,use_init", [(37, True, True), (48, False, True), (48, True, False),
                                                (1, True, True)])
def test_split_forward_matches_reference_f32(lt, t, use_seg, use_init):
    args, ref = lt.case(t, use_seg, use_init)
    o, st = split_forward(*args[:6], 16)
    assert lt.rel_err(o, ref[0]) < 1e-5 and lt.rel_err(st, ref[1]) < 1e-5


def test_split_forward_gradients(lt):
    """The custom VJP with the split forward (two chunks per output program: the state saved every other
    chunk, one chunk of padding only at the end) and the backward scans."""
    args, ref = lt.case(37, True, True)
    got = gpu_fwd_and_grads(*args, 16, forward="split", out_chunks=2)
    for name, a, r in zip(lt.NAMES, got, ref):
        assert lt.rel_err(a, r) < 1e-5, name


def test_split_forward_bf16_inputs_float32_state(lt):
    args, ref = lt.case(37, True, True, dtype=jnp.bfloat16)
    o, st = split_forward(*args[:6], 16)
    assert o.dtype == jnp.bfloat16 and st.dtype == jnp.float32
    assert lt.rel_err(o.astype(jnp.float32), ref[0].astype(jnp.float32)) < 1e-2
    assert lt.rel_err(st, ref[1]) < 1e-2


def test_split_forward_tiles_windows_and_padded_head_dims(lt):
    """d_k 20 and d_v 20 are zero-padded to 32; the state pass splits the state into 2 x 2 tiles of 16 x 16,
    the output pass the outputs into 2 tiles of 16 columns, each over windows of 3 chunks (7 chunks of 16
    tokens, padded to 9)."""
    b, t, h, d = 2, 101, 3, 20
    q, k, v, s0, _, _ = lt.make_inputs(46, b, t, h, d)
    seg = lt.packed_segments(b, t, 47)
    slopes = jnp.asarray(lt.SLOPES[[2, 5, 9]])
    o_ref, st_ref = lightning_attention(q, k, v, slopes, initial_state=s0, segment_ids=seg, impl="reference")
    o, st = split_forward(q, k, v, slopes, s0, seg, 16, key_tile=16, value_tile=16, out_tile=16, out_chunks=3)
    assert o.shape == (b, t, h, d) and st.shape == (b, h, d, d)
    assert lt.rel_err(o, o_ref) < 1e-5 and lt.rel_err(st, st_ref) < 1e-5


def test_decode_kernel_matches_jnp_step(lt):
    b, h, dk, dv = 3, 4, 8, 24  # d_v padded to 32: two tiles of 16 columns
    q, k, _, s0, _, _ = lt.make_inputs(44, b, 1, h, dk, dv=dv)
    v = jnp.asarray(np.random.default_rng(45).uniform(-1, 1, (b, h, dv)), jnp.float32)
    slopes = jnp.asarray(lt.SLOPES[:h])
    o_x, s_x = lightning_decode_step(s0, q[:, 0], k[:, 0], v, slopes, impl="xla")
    o_p, s_p = jax.jit(lambda *a: decode_step_pallas_gpu(*a, value_tile=16))(s0, q[:, 0], k[:, 0], v, slopes)
    assert o_p.shape == (b, h, dv) and s_p.shape == (b, h, dk, dv)
    assert lt.rel_err(o_p, o_x) < 1e-6 and lt.rel_err(s_p, s_x) < 1e-6


def test_prefill_then_decode_equals_one_call(lt):
    b, t, n, h, d = 2, 23, 17, 3, 8
    q, k, v, s0, _, _ = lt.make_inputs(21, b, t, h, d)
    slopes = jnp.asarray(lt.SLOPES[[0, 4, 11]])
    o_all, s_all = lightning_attention(q, k, v, slopes, initial_state=s0, impl="reference")
    o_pre, state = lightning_pallas_gpu(q[:, :n], k[:, :n], v[:, :n], slopes, s0, None, 8)
    outs = [o_pre]
    step = jax.jit(lambda *a: lightning_decode_step(*a, impl="pallas"))
    for i in range(n, t):
        o_i, state = step(state, q[:, i], k[:, i], v[:, i], slopes)
        outs.append(o_i[:, None])
    assert lt.rel_err(jnp.concatenate(outs, axis=1), o_all) < 1e-5
    assert lt.rel_err(state, s_all) < 1e-5


def test_gpu_target_dispatch_lowers_to_triton():
    """Inside gpu_target() impl="auto" picks the GPU kernels and a CPU host lowers them to Triton calls:
    one for the forward, three more for the backward, one for the decode step."""
    b, t, h, d = 1, 200, 2, 128
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    slopes = jax.ShapeDtypeStruct((h,), jnp.float32)

    def loss(q, k, v, s):
        o, st = lightning_attention(q, k, v, s)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(st)

    def lowered(f, *args):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    with gpu_target():
        assert resolve_impl("auto") == "pallas"
        assert lowered(lambda *a: lightning_attention(*a)[0], q, q, q, slopes).count(TRITON_CALL) == 1
        assert lowered(jax.grad(loss, argnums=(0, 1, 2)), q, q, q, slopes).count(TRITON_CALL) == 4
        state = jax.ShapeDtypeStruct((64, h, d, d), jnp.float32)
        tok = jax.ShapeDtypeStruct((64, h, d), jnp.bfloat16)
        assert lowered(lightning_decode_step, state, tok, tok, tok, slopes).count(TRITON_CALL) == 1


def test_split_forward_lowers_to_triton():
    """A CPU host lowers the split forward to two Triton calls (state pass, output pass), and its gradient to
    five (the backward's three scans)."""
    b, t, h, d = 1, 200, 2, 128
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    slopes = jax.ShapeDtypeStruct((h,), jnp.float32)
    s0 = jax.ShapeDtypeStruct((b, h, d, d), jnp.float32)

    def attention(q, k, v, s, s0):
        return lightning_pallas_gpu(q, k, v, s, s0, None, 256, interpret=False, forward="split", out_chunks=2)

    def loss(*args):
        o, st = attention(*args)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(st)

    def lowered(f):
        return jax.jit(f).trace(q, q, q, slopes, s0).lower(lowering_platforms=("cuda",)).as_text()

    fwd = lowered(attention)
    assert fwd.count(TRITON_CALL) == 2
    assert "lightning_split_states" in fwd and "lightning_split_out" in fwd
    assert lowered(jax.grad(loss, argnums=(0, 1, 2))).count(TRITON_CALL) == 5


def test_chunks_and_argument_errors():
    assert [gpu_chunk(n) for n in (256, 64, 37, 16, 8)] == [64, 64, 32, 16, 16]
    q = jnp.ones((1, 8, 1, 16))
    s0 = jnp.zeros((1, 1, 16, 16))
    with pytest.raises(ValueError, match="value_tile must be a power of two"):
        lightning_pallas_gpu(q, q, q, jnp.ones((1,)), s0, None, 16, value_tile=24)
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        lightning_pallas_gpu(q, q, q, jnp.ones((1,)), s0, None, 16, chunk=8)
    with pytest.raises(ValueError, match="forward must be one of"):
        lightning_pallas_gpu(q, q, q, jnp.ones((1,)), s0, None, 16, forward="fused")
    with pytest.raises(ValueError, match="apply to forward='split' only"):
        lightning_pallas_gpu(q, q, q, jnp.ones((1,)), s0, None, 16, out_chunks=2)
    with pytest.raises(ValueError, match="key_tile must be a power of two"):
        lightning_pallas_gpu(q, q, q, jnp.ones((1,)), s0, None, 16, forward="split", key_tile=24)
    with pytest.raises(ValueError, match="out_tile must be a power of two"):
        lightning_pallas_gpu(q, q, q, jnp.ones((1,)), s0, None, 16, forward="split", out_tile=8)
    with pytest.raises(ValueError, match="out_chunks must be a positive int"):
        lightning_pallas_gpu(q, q, q, jnp.ones((1,)), s0, None, 16, forward="split", out_chunks=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        lightning_decode_step(s0, q[:, 0], q[:, 0], q[:, 0], jnp.ones((1,)), impl="triton")
