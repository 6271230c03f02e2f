"""Inference state: a constant-size float32 state per lightning layer, a KV cache per softmax layer.

Laid out like the model's parameters so that the layer scan (:meth:`M1Model.run_layers`) walks the
cache together with the weights: a leading ``[num_periods]`` axis, then per period the lightning
layers (in layer order) and the softmax layers (in layer order) of that period.

* ``lightning`` float32 ``[periods, lightning layers per period, batch, heads, head_dim, head_dim]``:
  the recurrent state ``S`` after the last token fed (independent of the context length);
* ``keys`` / ``values`` ``[periods, softmax layers per period, batch, max_len, kv_heads, head_dim]``:
  keys hold RoPE already applied; slot ``s`` of a row holds its ``s``-th real token;
* ``lengths`` int32 ``[batch]``: real tokens fed so far per row (= the next token's position and slot).

A call that feeds ``T`` tokens per row says how many of them are real with ``n_valid`` [batch]: real
tokens come first in each row, the rest is padding that touches nothing (no decay, no cache write).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from m1_jax import sharding
from m1_jax.config import FULL, LINEAR, M1Config

class CacheError(ValueError):
    """A request that does not fit the cache (too long a prompt, wrong batch size)."""


def period_layout(cfg: M1Config) -> tuple[int, int]:
    """(lightning layers, softmax layers) per period."""
    kinds = cfg.layer_types[: cfg.period]
    return sum(t == LINEAR for t in kinds), sum(t == FULL for t in kinds)


def round_max_len(n: int) -> int:
    """Cache length for at least ``n`` tokens: a power of two up to 128, then a multiple of 128 (so that
    the blockwise attention's key blocks, :func:`m1_jax.layers.blockwise.key_block`, are at least 16)."""
    n = max(int(n), 16)
    return 1 << (n - 1).bit_length() if n <= 128 else -(-n // 128) * 128


class CacheStep(NamedTuple):
    """Where a call writes: per row the slot of its first token (``start``) and how many are real."""

    start: jax.Array    # int32 [batch]
    n_valid: jax.Array  # int32 [batch]

    def positions(self, time: int) -> jax.Array:
        """int32 [batch, time]: RoPE position = cache slot of each token (padding beyond the real ones)."""
        return self.start[:, None] + jnp.arange(time, dtype=jnp.int32)[None]

    def real(self, time: int) -> jax.Array:
        """bool [batch, time]: which tokens of the call are real."""
        return jnp.arange(time, dtype=jnp.int32)[None] < self.n_valid[:, None]


# The cache as the layer scan walks it: (lightning states, keys, values), each with a leading period axis
# (the scan hands each period its lightning states; the keys and values stay whole, indexed in place); and
# one layer's part: a lightning state, or (keys, values, (period, index)) for a softmax layer.
CacheLayers = tuple[jax.Array, jax.Array, jax.Array]
LayerCache = jax.Array | tuple[jax.Array, jax.Array, tuple]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    lightning: jax.Array
    keys: jax.Array
    values: jax.Array
    lengths: jax.Array

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    @property
    def layers(self) -> CacheLayers:
        """What the layer scan walks: (lightning states, keys, values), each with a leading period axis."""
        return self.lightning, self.keys, self.values

    def replace(self, **kw) -> "Cache":
        return dataclasses.replace(self, **kw)

    def nbytes(self) -> dict[str, int]:
        return {"lightning": self.lightning.nbytes, "kv": self.keys.nbytes + self.values.nbytes}


def cache_shapes(cfg: M1Config, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    """The cache as ``jax.ShapeDtypeStruct`` leaves (for planning and AOT compilation)."""
    n_lin, n_soft = period_layout(cfg)
    P, H, KV, d = cfg.num_periods, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    sds = jax.ShapeDtypeStruct
    return Cache(
        lightning=sds((P, n_lin, batch, H, d, d), jnp.float32),
        keys=sds((P, n_soft, batch, max_len, KV, d), jnp.dtype(dtype)),
        values=sds((P, n_soft, batch, max_len, KV, d), jnp.dtype(dtype)),
        lengths=sds((batch,), jnp.int32),
    )


def init_cache(cfg: M1Config, batch: int, max_len: int, dtype=jnp.float32, *, round_len: bool = True,
               mesh=None) -> Cache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens (rounded up with ``round_len``).

    ``dtype`` is the KV dtype (the model's compute dtype); lightning states are always float32. With a
    ``mesh`` the arrays are created sharded like the model (:data:`CACHE_LOGICAL_AXES`).
    """
    if batch <= 0 or max_len <= 0:
        raise CacheError(f"cache needs a positive batch and max_len, got batch={batch}, max_len={max_len}")
    if round_len:
        max_len = round_max_len(max_len)
    shapes = cache_shapes(cfg, batch, max_len, dtype)
    if mesh is None:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    shardings = cache_shardings(shapes, mesh)
    return jax.tree.map(lambda s, sh: jnp.zeros(s.shape, s.dtype, device=sh), shapes, shardings)


def cache_shardings(cache: Cache, mesh) -> Cache:
    """``NamedSharding`` per cache array on ``mesh`` (the model's rules: batch over data/fsdp/expert,
    lightning heads and KV heads over tensor); ``cache`` may hold arrays or ``ShapeDtypeStruct`` leaves."""
    return jax.tree.map(lambda names, a: sharding.named_sharding(names, mesh, a.shape, what="cache"),
                        CACHE_LOGICAL_AXES, cache, is_leaf=lambda x: isinstance(x, tuple))


# Logical axis names of the cache arrays (mapped to mesh axes like the parameters' names).
CACHE_LOGICAL_AXES = Cache(
    lightning=("layers", None, "batch", "heads", None, None),
    keys=("layers", None, "batch", "length", "kv_heads", "head_dim"),
    values=("layers", None, "batch", "length", "kv_heads", "head_dim"),
    lengths=("batch",),
)
