"""Parameter creation shared by the layers: Flax layout ``[in, out]`` plus logical axis names; the
projections' matmul, in floating point or with int8 weights (:mod:`m1_jax.quant`), with or without a LoRA
adapter (:mod:`m1_jax.lora`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from m1_jax.lora.spec import LORA_A, LORA_B
from m1_jax.quant.spec import SCALE_SUFFIX, quantize, scale_shape

# A LoRA adapter of a weight as the matmuls take it: (A [in..., r], B [r, out...], alpha / rank).
Adapter = tuple[jax.Array, jax.Array, float]


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


def weight(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...], *, dtype, std: float,
           contracted: int | None = None, stacked: int = 0) -> tuple[nnx.Param, nnx.Param | None]:
    """A matmul weight (:func:`param`) and, when ``contracted`` is given, stored in int8: (int8 values, float32
    per-output-channel scales over the weight's axes without its ``contracted`` leading ones after ``stacked``
    stacked axes), the random draw quantized (:func:`m1_jax.quant.spec.quantize`). Without: (param, None)."""
    p = param(rngs, shape, axes, dtype=dtype, std=std)
    if contracted is None:
        return p, None
    q, s = quantize(p.get_value(), stacked, contracted, xp=jnp)
    return (nnx.Param(q, out_sharding=axes, eager_sharding=False),
            nnx.Param(s, out_sharding=scale_shape(axes, stacked, contracted), eager_sharding=False))


def weights_of(module: nnx.Module, name: str) -> tuple[jax.Array, jax.Array | None]:
    """(value of weight ``name``, its int8 scales or None) (:func:`weight`)."""
    scale = getattr(module, name + SCALE_SUFFIX, None)
    return getattr(module, name)[...], None if scale is None else scale[...]


def adapter_of(module: nnx.Module, name: str) -> Adapter | None:
    """The LoRA adapter of weight ``name`` (:func:`m1_jax.lora.adapters.add_adapters`), or None."""
    a = getattr(module, name + LORA_A, None)
    if a is None:
        return None
    return a[...], getattr(module, name + LORA_B)[...], module.lora_scale


def matmul(x: jax.Array, w: jax.Array, contract: int = 1, dtype=None, scale: jax.Array | None = None,
           lora: Adapter | None = None) -> jax.Array:
    """``x @ w`` over the last ``contract`` dims of ``x`` and the first of ``w``, in ``dtype``.

    ``scale``: ``w`` is int8 with these per-output-channel scales (``w``'s shape without its first
    ``contract`` axes). Qwix's ``dot_general`` runs it on a ``qwix.QArray`` (weight-only: it dequantizes the
    operand inside the matmul, which XLA fuses, so no full-precision copy of the weight is kept).
    ``lora``: adds ``(x @ A) @ B * alpha / rank`` (:mod:`m1_jax.lora`; why not qwix's LoRA: see
    :mod:`m1_jax.lora.adapters`)."""
    dtype = dtype or x.dtype
    lhs = tuple(range(x.ndim - contract, x.ndim))
    rhs = tuple(range(contract))
    if scale is None:
        y = jax.lax.dot_general(x.astype(dtype), w.astype(dtype), ((lhs, rhs), ((), ())))
    else:
        q = qwix.QArray(qvalue=w, scale=scale.reshape((1,) * contract + scale.shape).astype(dtype), qtype=jnp.int8)
        y = qwix.dot_general(x.astype(dtype), q, ((lhs, rhs), ((), ())))
    if lora is None:
        return y
    a, b, s = lora
    u = jax.lax.dot_general(x.astype(dtype), a.astype(dtype), ((lhs, rhs), ((), ())))
    return y + (jax.lax.dot_general(u, b.astype(dtype), (((u.ndim - 1,), (0,)), ((), ()))) * s).astype(y.dtype)
