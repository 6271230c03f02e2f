"""Softmax attention layer (every 8th layer of M1): GQA with partial rotary embedding.

Query head ``h`` reads KV head ``h // (heads / kv_heads)``; scores ``q k^T / sqrt(head_dim)`` with a
float32 softmax under a causal (and same-segment) mask. The full-sequence path runs the Pallas
splash-attention kernel when tracing for TPU (:mod:`m1_jax.layers.splash`), otherwise XLA in tiles that
skip the masked ones, forward and backward (:mod:`m1_jax.layers.causal_tiles`); attention against the
KV cache is tiled the same way (:mod:`m1_jax.layers.blockwise`). :func:`gqa_attention` with
:func:`attention_mask` is the dense reference: [T, T] scores, the masked half computed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from m1_jax.cache import CacheStep
from m1_jax.config import M1Config
from m1_jax.layers.blockwise import blockwise_attention, key_block
from m1_jax.layers.causal_tiles import tiled_causal_attention
from m1_jax.layers.common import adapter_of, matmul, weight, weights_of
from m1_jax.layers.rope import apply_rope
from m1_jax.layers.splash import log_fallback, splash_attention, unsupported_reason
from m1_jax.quant.spec import QuantConfig
from pallas_kernels.platform import targeting_tpu


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None = None,
                   k_seg: jax.Array | None = None) -> jax.Array:
    """[batch, q_time, k_time] bool: key at or before the query, in the same segment."""
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, Tq, H, d], k/v [B, Tk, KV, d], mask [B, Tq, Tk] -> [B, Tq, H, d]; fp32 softmax."""
    B, Tq, H, d = q.shape
    KV = k.shape[2]
    qg = q.reshape(B, Tq, KV, H // KV, d)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, Tq, H, d).astype(q.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Full-sequence causal GQA attention, q [B, T, H, d], k/v [B, T, KV, d] -> [B, T, H, d].

    Causality is by index (positions may restart inside a packed row); documents by segment id.
    When tracing for TPU (a TPU backend or ``pallas_kernels.platform.tpu_target()``) shapes the
    Pallas splash kernel accepts run through it (:mod:`m1_jax.layers.splash`); otherwise the tiled XLA
    path (:mod:`m1_jax.layers.causal_tiles`), which skips the masked tiles and never builds [T, T] scores.
    """
    if targeting_tpu():
        reason = unsupported_reason(q.shape, k.shape)
        if reason is None:
            return splash_attention(q, k, v, segment_ids)
        log_fallback(reason)
    return tiled_causal_attention(q, k, v, segment_ids)


class SoftmaxAttention(nnx.Module):
    def __init__(self, cfg: M1Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 quantize: QuantConfig | None = None):
        D, H, KV, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        std = cfg.initializer_range
        self.cfg = cfg
        self.dtype = dtype
        qin, qout = ({}, {}) if quantize is None or not quantize.attention else ({"contracted": 1}, {"contracted": 2})
        kw = dict(dtype=param_dtype, std=std)
        self.q_proj, self.q_proj_scale = weight(rngs, (D, H, d), ("embed", "heads", "head_dim"), **kw, **qin)
        self.k_proj, self.k_proj_scale = weight(rngs, (D, KV, d), ("embed", "kv_heads", "head_dim"), **kw, **qin)
        self.v_proj, self.v_proj_scale = weight(rngs, (D, KV, d), ("embed", "kv_heads", "head_dim"), **kw, **qin)
        self.o_proj, self.o_proj_scale = weight(rngs, (H, d, D), ("heads", "head_dim", "embed"), **kw, **qout)

    def project_qkv(self, h: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k (both rotated) and v for ``h`` [batch, time, hidden] at ``positions`` [batch, time]."""
        cfg = self.cfg
        q = self._project(h, "q_proj")
        k = self._project(h, "k_proj")
        v = self._project(h, "v_proj")
        q = apply_rope(q, positions, cfg.rotary_dim, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rotary_dim, cfg.rope_theta)
        return q, k, v

    def _project(self, x: jax.Array, name: str, contract: int = 1) -> jax.Array:
        w, scale = weights_of(self, name)
        return matmul(x, w, contract=contract, dtype=self.dtype, scale=scale, lora=adapter_of(self, name))

    def __call__(self, h: jax.Array, positions: jax.Array, *,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        q, k, v = self.project_qkv(h, positions)
        o = causal_attention(q, k, v, segment_ids)
        return self._project(o, "o_proj", contract=2)

    def cached(self, h: jax.Array, keys: jax.Array, values: jax.Array, step: CacheStep,
               layer: tuple = ()) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attention of ``h`` [batch, time, hidden] against a KV cache, writing the new keys first.

        ``step`` (:class:`m1_jax.cache.CacheStep`): token ``t`` of row ``b`` is real iff
        ``t < n_valid[b]`` and goes to slot (and RoPE position) ``start[b] + t``; padding is not
        written. keys/values [batch, max_len, kv_heads, head_dim], or the cache of all layers with
        leading axes that the integer indices ``layer`` pick this layer from (written and read in place)
        -> (output, keys, values).
        """
        B, T = h.shape[:2]
        S = keys.shape[len(layer) + 1]
        positions = step.positions(T)
        q, k, v = self.project_qkv(h, positions)
        slots = jnp.where(step.real(T), positions, S)  # out of range: dropped
        at = (*layer, jnp.arange(B)[:, None], slots)
        keys = keys.at[at].set(k.astype(keys.dtype), mode="drop")
        values = values.at[at].set(v.astype(values.dtype), mode="drop")
        o = blockwise_attention(q, keys, values, positions, step.start + step.n_valid, block=key_block(S),
                                layer=layer)
        return self._project(o, "o_proj", contract=2), keys, values
