"""Inference cache layout, blockwise attention over the cache, cached runs of lightning-only and
softmax-only stacks against one full forward."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m1_jax
from m1_jax.cache import cache_shapes, round_max_len
from m1_jax.config import FULL, LINEAR, M1Config, kv_cache_bytes, lightning_state_bytes
from m1_jax.generation import decode_step, prefill
from m1_jax.layers import blockwise
from m1_jax.layers.blockwise import blockwise_attention, key_block
from tiny_models import tiny_config

ATOL = 1e-4


def dense_reference(q, keys, values, q_pos, kv_len):
    """Plain masked softmax over the whole cache (float64 numpy)."""
    q, keys, values = (np.asarray(a, np.float64) for a in (q, keys, values))
    B, Tq, H, d = q.shape
    G = H // keys.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            s = q[b, :, h] @ keys[b, :, h // G].T / math.sqrt(d)  # [Tq, S]
            slot = np.arange(keys.shape[1])
            mask = (slot[None] <= np.asarray(q_pos)[b][:, None]) & (slot[None] < kv_len[b])
            s = np.where(mask, s, -np.inf)
            m = s.max(-1, keepdims=True)
            p = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
            den = p.sum(-1, keepdims=True)
            out[b, :, h] = (p / np.where(den > 0, den, 1)) @ values[b, :, h // G]
    return out


# (key block, query rows per tile, one batch row per tile): query blocks of 1 token (a decode step's
# tile), of 4 and 2 tokens, and the default (one query block). Tiles under 8 rows put the keys on the long
# side of the score matmul (the decode form).
TILINGS = [(8, 2, False), (8, 8, True), (32, 4, False), (4, blockwise.QUERY_ROWS, False)]


@pytest.fixture
def tiling(monkeypatch):
    def set_tiling(query_rows, row_per_tile):
        monkeypatch.setattr(blockwise, "QUERY_ROWS", query_rows)
        if row_per_tile:
            monkeypatch.setattr(blockwise, "TILE_BYTES", 0)
        monkeypatch.setattr(blockwise, "FEW_ROWS", 8)
    return set_tiling


@pytest.mark.parametrize("Tq", [1, 5, 19])
@pytest.mark.parametrize("block,query_rows,row_per_tile", TILINGS, ids=[f"keys{t[0]}-rows{t[1]}" for t in TILINGS])
def test_blockwise_attention_matches_dense(block, query_rows, row_per_tile, Tq, tiling):
    tiling(query_rows, row_per_tile)
    rng = np.random.default_rng(7)
    B, H, KV, d, S = 3, 4, 2, 8, 32
    q = rng.normal(size=(B, Tq, H, d)).astype(np.float32)
    keys = rng.normal(size=(B, S, KV, d)).astype(np.float32)
    values = rng.normal(size=(B, S, KV, d)).astype(np.float32)
    kv_len = np.array([20, 5, 0], np.int32)  # last row: nothing cached yet
    q_pos = kv_len[:, None] - Tq + np.arange(Tq)[None]  # the new tokens are the last Tq cached
    got = blockwise_attention(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values), jnp.asarray(q_pos),
                              jnp.asarray(kv_len), block=block)
    want = dense_reference(q, keys, values, q_pos, kv_len)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert not np.asarray(got[2]).any()  # a query that sees no key gets zeros
    assert np.isfinite(np.asarray(got)).all()


@pytest.mark.parametrize("block,query_rows,row_per_tile", TILINGS, ids=[f"keys{t[0]}-rows{t[1]}" for t in TILINGS])
def test_blockwise_attention_any_positions(block, query_rows, row_per_tile, tiling):
    """Positions in any order per row, some past the row's length, some before its first key."""
    tiling(query_rows, row_per_tile)
    rng = np.random.default_rng(8)
    B, Tq, H, KV, d, S = 2, 9, 4, 2, 8, 32
    q = rng.normal(size=(B, Tq, H, d)).astype(np.float32)
    keys = rng.normal(size=(B, S, KV, d)).astype(np.float32)
    values = rng.normal(size=(B, S, KV, d)).astype(np.float32)
    kv_len = np.array([29, 13], np.int32)
    q_pos = np.array([[8, 0, 31, 16, 3, 4, 24, 17, 12], [-1, 12, 4, 30, 8, 0, 5, 13, 9]], np.int32)
    got = blockwise_attention(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values), jnp.asarray(q_pos),
                              jnp.asarray(kv_len), block=block)
    want = dense_reference(q, keys, values, q_pos, kv_len)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert not np.asarray(got[1, 0]).any()


def test_layout_matches_the_parameter_stack():
    m1 = M1Config()
    c = cache_shapes(m1, batch=2, max_len=4096, dtype=jnp.bfloat16)
    assert c.lightning.shape == (10, 7, 2, 64, 128, 128) and c.lightning.dtype == jnp.float32
    assert c.keys.shape == c.values.shape == (10, 1, 2, 4096, 8, 128) and c.keys.dtype == jnp.bfloat16
    assert c.lengths.shape == (2,)
    # 4 MiB per lightning layer per sequence, whatever the context
    assert lightning_state_bytes(m1) == 70 * 4 * 2 ** 20
    assert cache_shapes(m1, 1, 131072).lightning.shape == cache_shapes(m1, 1, 1024).lightning.shape
    assert kv_cache_bytes(m1, 1, 2048, jnp.bfloat16) == 2 * kv_cache_bytes(m1, 1, 1024, jnp.bfloat16)
    for n in (1, 17, 100, 129, 1000, 131072):
        S = round_max_len(n)
        assert S >= n and S % key_block(S) == 0 and key_block(S) >= 16


@pytest.mark.parametrize("types", [(LINEAR, LINEAR), (FULL, FULL)], ids=["lightning-only", "softmax-only"])
def test_cached_decode_equals_full_forward(types):
    cfg = tiny_config(layer_types=types, block_size=4)
    model = m1_jax.init_model(cfg, seed=1)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 13)).astype(np.int32)
    full = np.asarray(model(jnp.asarray(ids)))
    cache, logits = prefill(model, [ids[0, :6].tolist(), ids[1, :9].tolist()], max_len=16, chunk_size=4)
    assert cache.lightning.shape[:2] == ((2, 1) if types[0] == LINEAR else (2, 0))
    assert cache.keys.shape[:2] == ((2, 0) if types[0] == LINEAR else (2, 1))
    np.testing.assert_allclose(np.asarray(logits), full[[0, 1], [5, 8]], rtol=0, atol=ATOL)
    got = []
    for j in range(4):
        cache, logits = decode_step(model, cache, [ids[0, 6 + j], ids[1, 9 + j]])
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.stack(got, 1)[0], full[0, 6:10], rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.stack(got, 1)[1], full[1, 9:13], rtol=0, atol=ATOL)
    # a row that does not advance keeps its cache exactly
    before = jax.tree.map(np.array, cache)  # decode_step consumes (donates) the cache it is given
    cache, _ = decode_step(model, cache, [1, 2], valid=[False, True])
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a)[..., 0, :, :, :] if a.ndim == 6 else np.asarray(a)[0],
                                      np.asarray(b)[..., 0, :, :, :] if b.ndim == 6 else np.asarray(b)[0])
