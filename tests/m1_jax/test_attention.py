"""The tiled full-sequence causal attention (``causal_attention`` off TPU) against the dense reference
``gqa_attention`` + ``attention_mask``: values and gradients, with and without segment ids, over block
sizes that leave partial blocks, one batch row per tile, and tiles that see no key of their segment."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from m1_jax import sharding
from m1_jax.layers import blockwise
from m1_jax.layers.attention import attention_mask, causal_attention, gqa_attention
from m1_jax.layers.blockwise import key_blocks_seen, tile_ints
from m1_jax.layers.causal_tiles import tiled_causal_attention

# (batch, time, heads, kv_heads, head_dim, query rows per tile, key block, one batch row per tile,
#  score matmul with the keys on its long side as for decode-sized tiles)
CASES = [
    (2, 12, 4, 2, 16, 512, 256, False, True),  # a single tile
    (2, 37, 4, 2, 8, 16, 8, False, False),  # 8-token query blocks, 8-key blocks, time a multiple of neither
    (3, 40, 8, 2, 8, 32, 16, True, False),  # 4 heads per KV head, each batch row its own tile
    (1, 50, 6, 3, 8, 8, 16, False, True),  # 4-token query blocks inside 16-key blocks
    (2, 64, 4, 4, 8, 16, 16, True, False),  # one query head per KV head
    (2, 33, 4, 2, 8, 6, 4, False, True),  # 3-token query blocks across 4-key blocks: some end on a block's first key
]


def _qkv(b, t, h, kv, d, dtype=jnp.float32):
    """q, k, v and a cotangent weight, standard normal."""
    rng = np.random.default_rng(0)
    shapes = ((b, t, h, d), (b, t, kv, d), (b, t, kv, d), (b, t, h, d))
    q, k, v, w = (rng.standard_normal(s, np.float32) for s in shapes)
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(w)


def _segments(b, t):
    """Row 0 packs documents with boundaries off the blocks; the others take random, unsorted ids (a query
    block then meets key blocks with none of its segments)."""
    rng = np.random.default_rng(1)
    seg = rng.integers(0, 3, (b, t))
    seg[0] = np.searchsorted([7, 23], np.arange(t), side="right")
    return jnp.asarray(seg, jnp.int32)


def _reference(q, k, v, seg):
    idx = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return gqa_attention(q, k, v, attention_mask(idx, idx, seg, seg))


@pytest.fixture
def blocks(monkeypatch):
    def set_blocks(query_rows, key_block, row_per_tile, keys_long_side):
        monkeypatch.setattr(blockwise, "QUERY_ROWS", query_rows)
        monkeypatch.setattr(blockwise, "ROWS_KEY_BLOCK", key_block)
        if row_per_tile:
            monkeypatch.setattr(blockwise, "TILE_BYTES", 0)
        monkeypatch.setattr(blockwise, "FEW_ROWS", 1 << 30 if keys_long_side else 0)
    return set_blocks


@pytest.mark.parametrize("with_segments", [False, True], ids=["causal", "segments"])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[1]}-rows{c[5]}-keys{c[6]}" for c in CASES])
def test_values_and_gradients_match_dense(case, with_segments, blocks):
    b, t, h, kv, d, *tiling = case
    blocks(*tiling)
    q, k, v, w = _qkv(b, t, h, kv, d)
    seg = _segments(b, t) if with_segments else None

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_grads(fn, q, k, v, seg):
        return fn(q, k, v, seg), jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg) * w), (0, 1, 2))(q, k, v)

    (got, grads), (want, want_grads) = (value_and_grads(fn, q, k, v, seg)
                                        for fn in (tiled_causal_attention, _reference))
    assert got.shape == q.shape and got.dtype == q.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for name, g, r in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_jit_and_bf16(blocks):
    blocks(16, 8, False, False)
    q, k, v, _ = _qkv(2, 29, 4, 2, 16, jnp.bfloat16)
    seg = _segments(2, 29)
    got = jax.jit(causal_attention)(q, k, v, seg)
    assert got.dtype == jnp.bfloat16
    want = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), seg)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=2e-2)


def test_causal_attention_is_the_tiled_path_off_tpu():
    q, k, v, _ = _qkv(2, 40, 4, 2, 8)
    seg = _segments(2, 40)
    jaxprs = [str(jax.make_jaxpr(fn)(q, k, v, seg)) for fn in (causal_attention, tiled_causal_attention)]
    assert jaxprs[0] == jaxprs[1]


def _largest_intermediate(fn, *args) -> int:
    """Largest array (elements) any equation of ``fn``'s jaxpr, nested ones included, produces."""
    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (int(np.prod(o.aval.shape)) for o in eqn.outvars if hasattr(o.aval, "shape"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from walk(sub)
    return max(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def test_no_time_by_time_scores():
    """Forward and backward at 1,024 tokens hold nothing near a [heads, T, T] score array."""
    b, t, h, kv, d = 1, 1024, 4, 2, 16
    q, k, v, w = _qkv(b, t, h, kv, d)
    loss = lambda q, k, v: jnp.sum(tiled_causal_attention(q, k, v) * w)
    assert _largest_intermediate(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, k, v) <= h * t * t // 8
    dense = lambda q, k, v: jnp.sum(_reference(q, k, v, None) * w)
    assert _largest_intermediate(dense, q, k, v) >= h * t * t  # the check sees a [T, T] matrix


def test_query_blocks_visit_only_the_key_blocks_they_see():
    # 4 query tokens per tile (8 rows, 2 heads per KV head), key blocks of 4: block i sees blocks 0..i.
    pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
    qpos_t = tile_ints(pos, 4, 2, 1, fill=-1)
    seen = key_blocks_seen(qpos_t, jnp.array([16, 16]), 1, 4, 16)
    np.testing.assert_array_equal(seen, [1, 2, 3, 4] * 2)
    # a shorter row stops at its length; queries that see nothing (padding) visit nothing
    seen = key_blocks_seen(tile_ints(pos[:, :10], 4, 2, 1, fill=-1), jnp.array([16, 6]), 1, 4, 16)
    np.testing.assert_array_equal(seen, [1, 2, 3, 1, 2, 2])
    seen = key_blocks_seen(tile_ints(jnp.full((1, 4), -1, jnp.int32), 4, 2, 1, fill=-1), jnp.array([16]), 1, 4, 16)
    np.testing.assert_array_equal(seen, [0])
    # a query at the first slot of a block needs that block
    seen = key_blocks_seen(tile_ints(jnp.array([[0, 2, 4, 1]], jnp.int32), 4, 2, 1, fill=-1), jnp.array([16]), 1, 4, 16)
    np.testing.assert_array_equal(seen, [2])


def test_under_a_mesh_tiles_keep_the_sharded_batch(blocks):
    """With one batch row per tile the rows would be sliced out of a batch split across devices (an
    all-gather on each); under a mesh the tiles keep the batch, and the values stay those of one device."""
    blocks(16, 8, True, False)
    mesh = sharding.make_mesh("data=2,tensor=2", jax.devices()[:4])
    q, k, v, w = _qkv(2, 40, 4, 2, 8)
    seg = _segments(2, 40)
    put = lambda x, names: jax.device_put(x, sharding.named_sharding(names, mesh, x.shape))
    args = (put(q, ("batch", "length", "heads", None)), put(k, ("batch", "length", "kv_heads", None)),
            put(v, ("batch", "length", "kv_heads", None)), put(seg, ("batch", "length")))

    def grads(q, k, v, seg):
        with sharding.activate(mesh):
            return jax.grad(lambda q, k, v: jnp.sum(tiled_causal_attention(q, k, v, seg) * w), (0, 1, 2))(q, k, v)

    step = jax.jit(grads)
    assert "all-gather" not in step.lower(*args).compile().as_text()
    want = jax.jit(lambda q, k, v, seg: jax.grad(
        lambda q, k, v: jnp.sum(tiled_causal_attention(q, k, v, seg) * w), (0, 1, 2))(q, k, v))(q, k, v, seg)
    for got, ref in zip(step(*args), want):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
