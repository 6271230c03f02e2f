"""RMSNorm exactly as the original code: statistic in float32, weight applied after the cast back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m1_jax.layers.common import param


def rms_normalize(x: jax.Array, eps: float, axes: tuple[int, ...] = (-1,)) -> jax.Array:
    """``x * rsqrt(mean(x^2) + eps)`` in float32 over ``axes``, cast back to ``x.dtype``."""
    xf = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(xf), axis=axes, keepdims=True)
    return (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """``weight * cast(x_f32 * rsqrt(mean(x_f32^2) + eps))``; ``shape`` may span several axes
    (the lightning output norm normalises all heads jointly: shape ``(heads, head_dim)``)."""

    def __init__(self, shape: tuple[int, ...], axes: tuple[str | None, ...], *, eps: float,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.weight = param(None, shape, axes, dtype=param_dtype, value=1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        n = self.weight[...].ndim
        y = rms_normalize(x.astype(self.dtype), self.eps, tuple(range(-n, 0)))
        return self.weight[...].astype(self.dtype) * y
