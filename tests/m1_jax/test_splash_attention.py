"""The Pallas splash-attention path of softmax attention: interpret-mode numerics against
``gqa_attention`` on CPU, the shape fallback, and AOT compilation of the real kernel for TPU."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1_jax import sharding
from m1_jax.config import FULL
from m1_jax.layers.attention import SoftmaxAttention, attention_mask, causal_attention, gqa_attention
from m1_jax.layers.splash import splash_attention, unsupported_reason
from pallas_kernels.platform import tpu_target
from tiny_models import tiny_config

B, T, H, KV, D = 2, 256, 4, 2, 128


def _qkv(dtype=jnp.float32, b=B, t=T, h=H, kv=KV, d=D):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, t, kv, d), dtype)
    v = jax.random.normal(ks[2], (b, t, kv, d), dtype)
    return q, k, v


def _segments(b=B, t=T):
    # Row 0: documents of 100 and 156 tokens; row 1: three documents, boundaries off the blocks.
    seg = np.zeros((b, t), np.int32)
    seg[0, 100:] = 1
    seg[1, 37:] = 1
    seg[1, 200:] = 2
    return jnp.asarray(seg)


def _reference(q, k, v, seg):
    idx = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return gqa_attention(q, k, v, attention_mask(idx, idx, seg, seg))


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("with_segments", [False, True])
def test_interpret_matches_gqa_fp32(with_segments):
    q, k, v = _qkv()
    seg = _segments() if with_segments else None
    out = splash_attention(q, k, v, seg, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, _reference(q, k, v, seg)) < 1e-5


def test_interpret_matches_gqa_bf16():
    q, k, v = _qkv(jnp.bfloat16)
    seg = _segments()
    out = splash_attention(q, k, v, seg, interpret=True)
    assert out.dtype == jnp.bfloat16
    ref = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), seg)
    assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize("spec,kv", [("data=2,tensor=2", 2), ("data=2,tensor=4", 2)])
def test_interpret_under_mesh(spec, kv):
    """Per-shard kernels in shard_map; with tensor > kv_heads the KV heads are repeated per query head."""
    h = 8
    q, k, v = _qkv(h=h, kv=kv)
    seg = _segments()
    mesh = sharding.make_mesh(spec, jax.devices()[:np.prod([int(p.split("=")[1]) for p in spec.split(",")])])
    with sharding.activate(mesh):
        out = jax.jit(lambda q, k, v, s: splash_attention(q, k, v, s, interpret=True))(q, k, v, seg)
    assert _rel(out, _reference(q, k, v, seg)) < 1e-5


def test_unsupported_shapes_are_named():
    assert unsupported_reason((1, 256, 4, 128), (1, 256, 2, 128)) is None
    assert "multiple of 128" in unsupported_reason((1, 100, 4, 128), (1, 100, 2, 128))
    assert "head_dim 16" in unsupported_reason((1, 256, 4, 16), (1, 256, 2, 16))
    with pytest.raises(ValueError, match="sequence length 100"):
        splash_attention(*_qkv(t=100))


def test_tiny_shapes_fall_back_to_xla_on_tpu_target(caplog):
    """Inside tpu_target() shapes the kernel cannot take use the XLA path, with the reason logged."""
    q, k, v = _qkv(t=12, d=16)
    with caplog.at_level(logging.INFO, logger="m1_jax.layers.splash"), tpu_target():
        hlo = jax.jit(causal_attention).lower(q, k, v).as_text()
        out = causal_attention(q, k, v)
    assert "tpu_custom_call" not in hlo
    assert "sequence length 12 is not a multiple of 128" in caplog.text
    np.testing.assert_allclose(out, _reference(q, k, v, None), rtol=1e-6, atol=1e-6)


def test_cpu_never_takes_the_kernel():
    q, k, v = _qkv()
    assert "tpu_custom_call" not in jax.jit(causal_attention).lower(q, k, v).as_text()


def test_softmax_attention_aot_tpu_uses_kernel():
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is needed for TPU AOT compilation")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    except Exception as e:  # noqa: BLE001 - libtpu present but unusable here
        pytest.skip(f"TPU topology v5e:2x2 unavailable: {e}")
    cfg = tiny_config(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                      layer_types=(FULL,))
    layer = SoftmaxAttention(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    graphdef, params = nnx.split(layer)
    mesh = jax.sharding.Mesh(np.array([desc.devices[0]]), ("x",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)
    t = 1024
    h = jax.ShapeDtypeStruct((1, t, cfg.hidden_size), jnp.bfloat16, sharding=rep)
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=rep)

    def fwd(params, h, pos, seg):
        return nnx.merge(graphdef, params)(h, pos, segment_ids=seg)

    def loss(params, h, pos, seg):
        return jnp.sum(fwd(params, h, pos, seg).astype(jnp.float32) ** 2)

    with tpu_target():
        for fn in (fwd, jax.grad(loss)):
            text = jax.jit(fn).lower(jax.tree.map(sds, params), h, ids, ids).compile().as_text()
            assert "tpu_custom_call" in text
