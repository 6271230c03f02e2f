"""The arrays a model stores, with int8 weights and their scales (no JAX: ``m1 convert`` and ``m1 info``)."""

from __future__ import annotations

import numpy as np

from m1_jax.checkpoint_io.keys import param_layout
from m1_jax.checkpoint_io.plan import stack_dims
from m1_jax.config import M1Config
from m1_jax.quant.spec import QuantConfig, layer_param, resolve, scale_path, scale_shape


def stored_arrays(cfg: M1Config, param_dtype, quantize: QuantConfig | str | None = None
                  ) -> dict[tuple, tuple[tuple[int, ...], np.dtype, int]]:
    """Flat NNX path -> (shape, dtype, stacked axes) of every array of the model's state
    (:func:`m1_jax.checkpoint_io.keys.param_layout`): weights in ``param_dtype`` (the router in float32), those
    ``quantize`` names in int8, each followed by its float32 scales (:func:`m1_jax.quant.spec.scale_path`)."""
    qc = resolve(quantize)
    stacks = stack_dims(cfg)
    out = {}
    for path, (shape, fp32) in param_layout(cfg).items():
        n = stacks.get(path, 0)
        name = layer_param(path)
        contracted = None if qc is None or name is None else qc.contracted(name)
        if contracted is None:
            out[path] = (shape, np.dtype(np.float32) if fp32 else np.dtype(param_dtype), n)
        else:
            out[path] = (shape, np.dtype(np.int8), n)
            out[scale_path(path)] = (scale_shape(shape, n, contracted), np.dtype(np.float32), n)
    return out


def contracted_axes(path: tuple, quantize: QuantConfig | None) -> int | None:
    """Contracted axes of the parameter at ``path`` when ``quantize`` stores it in int8, else None."""
    name = layer_param(path)
    return None if quantize is None or name is None else quantize.contracted(name)


def weight_bytes(cfg: M1Config, param_dtype="bfloat16", quantize: QuantConfig | str | None = None) -> int:
    """Bytes of all of the model's weights (:func:`stored_arrays`), from the config alone."""
    return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
               for shape, dtype, _ in stored_arrays(cfg, param_dtype, quantize).values())
