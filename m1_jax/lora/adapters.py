"""LoRA adapters on a model's weights: adding them (:func:`add_adapters`), merging them
(:func:`merge_adapters`), and the parameter type that the train step differentiates (:class:`LoraParam`).

Why not qwix's LoRA: ``qwix.apply_lora_to_model`` creates the adapters lazily, on a first call of the whole
model, by intercepting ``dot_general`` / ``einsum`` and setting new attributes on the module that runs the op.
Our layers run inside ``jax.lax.scan`` over a copy of the period module merged from parameters stacked per
period (``M1Model.run_layers``), so adapters created there would be set on a transient copy, one period
at a time, never stacked or kept; and it does not see the experts' grouped matmuls at all (``ragged_dot``
or the chunked loop, :mod:`m1_jax.layers.experts`). So the adapters are created here, stacked like their
weights with the model's logical axis names (sharded by :mod:`m1_jax.sharding`, saved by Orbax), and the
layers add ``(x @ A) @ B * alpha / rank`` to their matmuls themselves (:func:`m1_jax.layers.common.matmul`,
:mod:`m1_jax.layers.experts`, :mod:`m1_jax.layers.expert_chunks`, :mod:`m1_jax.layers.moe_parallel`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1_jax import sharding
from m1_jax.lora.spec import EXPERT_TARGETS, LORA_A, LORA_B, TARGETS, LoraConfig, LoraError, adapter_shapes, delta


class LoraParam(nnx.Param):
    """A LoRA adapter matrix: the only parameters a LoRA run trains (and keeps optimizer state for)."""


def _stacked(target: str) -> int:
    """Stacked axes of a layer weight in the model's state: periods, and experts for the expert weights."""
    return 2 if target in EXPERT_TARGETS else 1


def _owners(model, lora: LoraConfig):
    """``(target, owner module, attribute, contracted axes)`` for each targeted weight the
    stacked layers have (lightning and softmax layers have different projections)."""
    for layer in model.periods.layers:
        for target, param in zip(lora.targets, lora.params()):
            owner_name, attr = param.split(".")
            owner = getattr(layer, owner_name)
            if hasattr(owner, attr) and getattr(owner, attr) is not None:
                yield target, owner, attr, TARGETS[target][1]


def add_adapters(model, lora: LoraConfig, rngs: nnx.Rngs | int = 0):
    """Adds LoRA adapters to ``model``'s ``lora.targets`` in place (``A`` uniform in ``+-1/sqrt(fan_in)``,
    ``B`` zero, in float32 whatever the base weights' dtype, on the model's mesh when it has one) and returns
    it. The base weights are left as they are (float or int8)."""
    if not isinstance(lora, LoraConfig):
        raise LoraError(f"add_adapters needs a LoraConfig, got {type(lora).__name__}")
    if getattr(model, "lora", None) is not None:
        raise LoraError(f"the model has LoRA adapters already ({model.lora})")
    rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
    mesh = model.mesh
    for target, owner, attr, contracted in _owners(model, lora):
        var = getattr(owner, attr)
        axes = var.get_metadata()["out_sharding"]
        stacked = _stacked(target)
        a_shape, b_shape = adapter_shapes(tuple(var.shape), stacked, contracted, lora.rank)
        a_axes = tuple(axes[:stacked + contracted]) + (None,)
        b_axes = tuple(axes[:stacked]) + (None,) + tuple(axes[stacked + contracted:])
        bound = 1.0 / np.sqrt(float(np.prod(var.shape[stacked:stacked + contracted])))
        a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound)
        b = jnp.zeros(b_shape, jnp.float32)
        if mesh is not None:
            a = sharding.put_array(a, sharding.named_sharding(a_axes, mesh, a.shape))
            b = sharding.put_array(b, sharding.named_sharding(b_axes, mesh, b.shape))
        setattr(owner, attr + LORA_A, LoraParam(a, out_sharding=a_axes, eager_sharding=False))
        setattr(owner, attr + LORA_B, LoraParam(b, out_sharding=b_axes, eager_sharding=False))
        owner.lora_scale = lora.scale
    model.lora = lora
    return model


def merge_adapters(model):
    """Folds ``model``'s adapters into its weights in place (``W + A B * alpha / rank`` in float32, stored in
    the weight's dtype) and removes them; returns ``model``. A model with int8 base weights is refused
    (``m1 export --merge-lora`` merges a QLoRA checkpoint into float32 weights)."""
    lora = getattr(model, "lora", None)
    if lora is None:
        return model
    if model.quantize is not None:
        raise LoraError("merge_adapters: the base weights are int8; export the checkpoint with "
                        "`m1 export --merge-lora` for merged float32 weights")
    owners = []
    for target, owner, attr, contracted in _owners(model, lora):
        stacked = _stacked(target)
        owners.append(owner)
        w = getattr(owner, attr)
        a, b = getattr(owner, attr + LORA_A)[...], getattr(owner, attr + LORA_B)[...]
        d = _stacked_delta(a, b, stacked, lora.scale)
        w.set_value((w[...].astype(jnp.float32) + d).astype(w.dtype))
        delattr(owner, attr + LORA_A)
        delattr(owner, attr + LORA_B)
    for owner in owners:
        if hasattr(owner, "lora_scale"):
            del owner.lora_scale
    model.lora = None
    return model


def _stacked_delta(a: jax.Array, b: jax.Array, stacked: int, scale: float) -> jax.Array:
    """``A B * scale`` over the stacked leading axes (each slot's own product)."""
    fn = lambda a, b: delta(a, b, scale, xp=jnp)
    for _ in range(stacked):
        fn = jax.vmap(fn)
    return fn(a, b)


def adapter_count(model) -> int:
    """Number of trainable LoRA parameters of ``model``."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, LoraParam)))
