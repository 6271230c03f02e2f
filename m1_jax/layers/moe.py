"""Top-k mixture of SwiGLU experts (dropless), with a float32 router and a load-balancing loss.

Router: ``p = softmax_fp32(g @ W_r)``; the top-k probabilities are renormalised to sum to one and
cast to the activation dtype (as the original code does). Expert ``e``:
``W2_e(SiLU(W1_e g) * W3_e g)`` (:mod:`.experts`). Two exact paths:

* ``"dense"``: every expert on every token, weighted by the (mostly zero) combine weights; the
  reference, cost ``num_experts / top_k`` times the useful work;
* grouped: (token, expert) pairs sorted by expert and run as grouped matmuls, then scattered back:
  the production path. ``"ragged"`` runs them with ``jax.lax.ragged_dot``, ``"chunked"`` expert by
  expert in fixed-size chunks of rows (:mod:`.expert_chunks`), ``"auto"`` (the default) picks the one
  fast on the backend being traced for (:func:`.experts.grouped_impl`: ragged on TPU, chunked on CPU
  and GPU). Under a mesh (:mod:`m1_jax.sharding`) they run expert-parallel in ``jax.shard_map``
  (:mod:`.moe_parallel`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m1_jax import sharding
from m1_jax.config import M1Config
from m1_jax.layers.common import adapter_of, param, weight
from m1_jax.layers.experts import GROUPED, experts_dense, experts_grouped, grouped_impl
from m1_jax.layers.moe_parallel import experts_sharded
from m1_jax.quant.spec import QuantConfig

MOE_IMPLS = ("auto",) + GROUPED + ("dense",)


def route(x: jax.Array, router: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [..., D] -> (router logits fp32 [..., E], top-k weights fp32 [..., k], expert ids [..., k])."""
    logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return logits, weights, experts


def load_balancing_loss(logits: jax.Array, experts: jax.Array, num_experts: int,
                        token_mask: jax.Array | None = None) -> jax.Array:
    """Switch/Mixtral auxiliary loss ``E * sum_e f_e P_e`` over the tokens of the layer.

    ``f_e``: routed (token, slot) pairs of expert e per token; ``P_e``: mean router probability.
    Its minimum, ``top_k``, is reached by uniform routing. ``token_mask`` (bool, the leading shape of
    ``logits``): only these tokens count (padding does not); None: all.
    """
    probs = jax.nn.softmax(logits.reshape(-1, num_experts), axis=-1)
    w = jnp.ones(probs.shape[:1], jnp.float32) if token_mask is None else token_mask.reshape(-1).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    hits = jax.nn.one_hot(experts.reshape(probs.shape[0], -1), num_experts, dtype=jnp.float32)
    f = jnp.einsum("nke,n->e", hits, w) / n
    return num_experts * jnp.sum(f * (w @ probs) / n)


class MoE(nnx.Module):
    def __init__(self, cfg: M1Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 impl: str = "auto", quantize: QuantConfig | None = None):
        if impl not in MOE_IMPLS:
            raise ValueError(f"moe impl must be one of {MOE_IMPLS}, got {impl!r}")
        D, E, I = cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
        std = cfg.initializer_range
        self.cfg = cfg
        self.dtype = dtype
        self.impl = impl
        # The router stays float32 whatever the parameter dtype (the release stores it so).
        self.gate = param(rngs, (D, E), ("embed", None), dtype=jnp.float32, std=std)
        # int8 experts (``quantize``): w1 / w3 / w2 int8 with float32 scales w1_scale [E, I], w3_scale, w2_scale [E, D]
        q = {} if quantize is None else {"contracted": 1, "stacked": 1}
        self.w1, self.w1_scale = weight(rngs, (E, D, I), ("experts", "embed", "mlp"), dtype=param_dtype, std=std, **q)
        self.w3, self.w3_scale = weight(rngs, (E, D, I), ("experts", "embed", "mlp"), dtype=param_dtype, std=std, **q)
        self.w2, self.w2_scale = weight(rngs, (E, I, D), ("experts", "mlp", "embed"), dtype=param_dtype, std=std, **q)

    def __call__(self, x: jax.Array, *, impl: str | None = None,
                 token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [batch, time, hidden] -> (output, router logits fp32 [batch, time, E], aux loss scalar).

        ``token_mask`` [batch, time] (bool): the tokens the aux loss averages over (None: all)."""
        impl = impl or self.impl
        if impl not in MOE_IMPLS:
            raise ValueError(f"moe impl must be one of {MOE_IMPLS}, got {impl!r}")
        B, T, D = x.shape
        logits, weights, experts = route(x, self.gate[...], self.cfg.num_experts_per_tok)
        grouped = grouped_impl() if impl == "auto" else impl
        w = (self.w1[...], self.w3[...], self.w2[...])
        scales = None if self.w1_scale is None else (self.w1_scale[...], self.w3_scale[...], self.w2_scale[...])
        lora = self._lora()
        if impl != "dense" and sharding.active_mesh() is not None:  # expert parallel (moe_parallel.py)
            y = experts_sharded(x, weights, experts, *w, self.dtype, grouped=grouped, scales=scales, lora=lora)
        else:
            flat = (x.reshape(B * T, D), weights.reshape(B * T, -1), experts.reshape(B * T, -1))
            y = (experts_dense(*flat, *w, self.dtype, scales=scales, lora=lora) if impl == "dense"
                 else experts_grouped(*flat, *w, self.dtype, grouped, scales=scales, lora=lora))
        aux = load_balancing_loss(logits, experts, self.cfg.num_local_experts, token_mask)
        return y.reshape(B, T, D), logits, aux

    def _lora(self):
        """The experts' LoRA adapters ((A, B) or None for w1, w3, w2; alpha / rank), or None
        (:mod:`m1_jax.lora`)."""
        ads = [adapter_of(self, name) for name in ("w1", "w3", "w2")]
        if all(a is None for a in ads):
            return None
        scale = next(a[2] for a in ads if a is not None)
        return tuple(None if a is None else a[:2] for a in ads), scale
