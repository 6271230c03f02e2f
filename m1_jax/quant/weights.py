"""Quantizing a model's weights to int8 in place (:func:`quantize_model`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from m1_jax import sharding
from m1_jax.quant.spec import ATTENTION_WEIGHTS, EXPERT_WEIGHTS, SCALE_SUFFIX, QuantizeError, quantize, resolve, scale_shape


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(w: jax.Array, stacked: int, contracted: int):
    return quantize(w, stacked, contracted, xp=jnp)


def _stacked(name: str) -> int:
    """Stacked axes of a layer weight in the model's state: periods, and experts for the expert weights."""
    return 2 if name in EXPERT_WEIGHTS else 1


def quantize_model(model, quantize="int8", *, attention: bool | None = None):
    """Stores ``model``'s expert weights (and with ``attention=True`` its attention projections) in int8 with
    per-output-channel float32 scales (:mod:`m1_jax.quant.spec`), in place: each floating-point weight is
    replaced (and its memory released when nothing else holds it) as soon as its int8 values exist, on the
    devices and shardings it had. Returns ``model``, which then runs its matmuls on the int8 weights.

    ``quantize``: ``"int8"`` or a :class:`~m1_jax.quant.spec.QuantConfig`. A model quantized already is
    returned as it is when asked for the same, refused otherwise."""
    qc = resolve(quantize, attention)
    if qc is None:
        raise QuantizeError("quantize_model needs quantize='int8' (or a QuantConfig)")
    if model.quantize is not None:
        if model.quantize != qc:
            raise QuantizeError(f"the model is quantized already ({model.quantize}); cannot quantize it as {qc}")
        return model
    mesh = model.mesh
    for layer in model.periods.layers:
        for name in (*EXPERT_WEIGHTS, *ATTENTION_WEIGHTS):
            contracted = qc.contracted(name)
            owner_name, attr = name.split(".")
            owner = getattr(layer, owner_name)
            if contracted is None or not hasattr(owner, attr):  # softmax vs lightning projections
                continue
            var = getattr(owner, attr)
            axes = var.get_metadata()["out_sharding"]
            stacked = _stacked(name)
            q, s = _quantize(var.get_value(), stacked, contracted)
            s_axes = scale_shape(axes, stacked, contracted)
            if mesh is not None:
                q = sharding.put_array(q, sharding.named_sharding(axes, mesh, q.shape))
                s = sharding.put_array(s, sharding.named_sharding(s_axes, mesh, s.shape))
            setattr(owner, attr, nnx.Param(q, out_sharding=axes, eager_sharding=False))
            # nnx.data: the attribute held None (static) in the floating-point model
            setattr(owner, attr + SCALE_SUFFIX, nnx.data(nnx.Param(s, out_sharding=s_axes, eager_sharding=False)))
            del var
    model.quantize = qc
    return model
