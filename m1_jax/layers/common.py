"""Parameter creation shared by the layers: Flax layout ``[in, out]`` plus logical axis names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...], *,
          dtype, std: float | None = None, value: float | None = None) -> nnx.Param:
    """A parameter annotated with logical axis names (mapped to mesh axes by ``m1_jax.sharding``).

    ``std`` draws N(0, std^2) (weights); ``value`` fills a constant (norm scales).
    """
    assert len(shape) == len(axes), (shape, axes)
    if value is not None:
        x = jnp.full(shape, value, dtype)
    else:
        x = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(x, out_sharding=axes, eager_sharding=False)


def matmul(x: jax.Array, w: jax.Array, contract: int = 1, dtype=None) -> jax.Array:
    """``x @ w`` over the last ``contract`` dims of ``x`` and the first of ``w``, in ``dtype``."""
    dtype = dtype or x.dtype
    lhs = tuple(range(x.ndim - contract, x.ndim))
    rhs = tuple(range(contract))
    return jax.lax.dot_general(x.astype(dtype), w.astype(dtype), ((lhs, rhs), ((), ())))
