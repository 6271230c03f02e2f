"""The DeepNorm post-norm decoder layer and the repeating period of layers that the model scans.

Per layer (docs/model.md §2.3), with the *normalised* input as the residual:
``h = RMSNorm(x); a = alpha_attn h + beta_attn Attn(h); g = RMSNorm(a); out = alpha_mlp g + beta_mlp MoE(g)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m1_jax import sharding
from m1_jax.cache import CacheLayers, CacheStep, LayerCache
from m1_jax.config import FULL, LINEAR, M1Config
from m1_jax.layers.attention import SoftmaxAttention
from m1_jax.layers.lightning import LightningAttention
from m1_jax.layers.moe import MoE
from m1_jax.layers.norms import RMSNorm
from m1_jax.quant.spec import QuantConfig


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: M1Config, layer_type: str, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, moe_impl: str = "auto", lightning_impl: str = "auto",
                 quantize: QuantConfig | None = None):
        D = cfg.hidden_size
        self.layer_type = layer_type
        self.dtype = dtype
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm((D,), ("embed",), **norm)
        if layer_type == LINEAR:
            self.self_attn = LightningAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                                impl=lightning_impl, quantize=quantize)
            self.alpha, self.beta = cfg.linear_attn_alpha, cfg.linear_attn_beta
        elif layer_type == FULL:
            self.self_attn = SoftmaxAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, quantize=quantize)
            self.alpha, self.beta = cfg.full_attn_alpha, cfg.full_attn_beta
        else:
            raise ValueError(f"unknown layer type {layer_type!r}")
        self.post_attention_layernorm = RMSNorm((D,), ("embed",), **norm)
        self.block_sparse_moe = MoE(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, impl=moe_impl,
                                    quantize=quantize)
        self.mlp_alpha, self.mlp_beta = cfg.mlp_alpha, cfg.mlp_beta

    def __call__(self, x: jax.Array, *, positions: jax.Array, slopes: jax.Array,
                 segment_ids: jax.Array | None = None, moe_impl: str | None = None,
                 cache: LayerCache | None = None, step: CacheStep | None = None):
        """-> (output, aux loss, updated cache or None). ``slopes`` is only read by lightning layers.

        With ``cache`` (this layer's part: its lightning state, or (keys, values, layer) with the KV cache of
        all softmax layers and this layer's indices into its leading axes) and ``step``
        (:class:`m1_jax.cache.CacheStep`) the layer runs against the inference cache; ``segment_ids`` then
        marks the real tokens (1) and padding (0)."""
        x = sharding.constrain(x, sharding.HIDDEN)
        h = self.input_layernorm(x.astype(self.dtype))
        if cache is not None:
            attn, cache = self._cached_attention(h, slopes, segment_ids, cache, step)
        elif self.layer_type == LINEAR:
            attn, _ = self.self_attn(h, slopes, segment_ids=segment_ids)
        else:
            attn = self.self_attn(h, positions, segment_ids=segment_ids)
        a = self.alpha * h + self.beta * attn
        g = self.post_attention_layernorm(a)
        real = None if segment_ids is None else segment_ids != 0  # padding does not count in the aux loss
        moe, _, aux = self.block_sparse_moe(g, impl=moe_impl, token_mask=real)
        out = sharding.constrain(self.mlp_alpha * g + self.mlp_beta * moe, sharding.HIDDEN)
        return out, aux, cache

    def _cached_attention(self, h: jax.Array, slopes: jax.Array, segment_ids: jax.Array, cache: LayerCache,
                          step: CacheStep) -> tuple[jax.Array, LayerCache]:
        if self.layer_type == LINEAR:
            if h.shape[1] == 1:  # decode: the one-token recurrence; rows without a real token keep their state
                attn, new = self.self_attn.decode(h, slopes, cache)
                cache = jnp.where((step.n_valid > 0)[:, None, None, None], new, cache)
            else:
                attn, cache = self.self_attn(h, slopes, segment_ids=segment_ids, state=cache)
        else:
            keys, values, layer = cache
            attn, keys, values = self.self_attn.cached(h, keys, values, step, layer=layer)
            cache = (keys, values)
        return attn, cache


class Period(nnx.Module):
    """One repetition of the layer pattern (8 layers for M1: 7 lightning + 1 softmax)."""

    def __init__(self, cfg: M1Config, *, rngs: nnx.Rngs, **kw):
        self.layers = nnx.List([DecoderLayer(cfg, cfg.layer_types[j], rngs=rngs, **kw)
                                for j in range(cfg.period)])

    def __call__(self, x: jax.Array, *, positions: jax.Array, slopes: jax.Array,
                 segment_ids: jax.Array | None = None, moe_impl: str | None = None, collect: bool = False,
                 cache: CacheLayers | None = None, step: CacheStep | None = None):
        """``slopes`` [period, heads] (rows of softmax layers unused) -> (x, per-layer outputs, aux,
        updated cache or None).

        Per-layer outputs are stacked only with ``collect`` (debugging; otherwise ``None``). ``cache`` is
        (this period's lightning states [n_lightning, ...], the keys and values of *all* periods
        [periods, n_softmax, ...], this period's index): lightning layers take the states in layer order;
        softmax layers write and read their slice of the keys and values in place (index (period, n)), so
        no layer's KV cache is copied out and back. Returns the cache as (states, keys, values)."""
        outs, aux = [], []
        if cache is not None:
            states, keys, values, period = cache
            states = list(states)
        seen = {LINEAR: 0, FULL: 0}  # layers of each kind so far: the index into that kind's cache
        for j, layer in enumerate(self.layers):
            n, linear = seen[layer.layer_type], layer.layer_type == LINEAR
            seen[layer.layer_type] += 1
            c = None if cache is None else states[n] if linear else (keys, values, (period, n))
            x, a, c = layer(x, positions=positions, slopes=slopes[j], segment_ids=segment_ids, moe_impl=moe_impl,
                            cache=c, step=step)
            if cache is not None and linear:
                states[n] = c
            elif cache is not None:
                keys, values = c
            outs.append(x)
            aux.append(a)
        if cache is not None:  # a period without lightning layers keeps its (empty) states as they are
            cache = (jnp.stack(states) if states else cache[0], keys, values)
        return x, (jnp.stack(outs) if collect else None), jnp.stack(aux), cache
