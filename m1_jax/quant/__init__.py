"""int8 weights: what is quantized and how (:mod:`.spec`, no JAX), the arrays a quantized model stores
(:mod:`.layout`, no JAX), and quantizing a model in place (:mod:`.weights`). The matmuls on int8 weights
live with the layers: :func:`m1_jax.layers.common.matmul` (attention projections, through qwix) and
:mod:`m1_jax.layers.experts` (the routed experts' grouped matmuls). docs/quantization.md describes it all.

The names below are imported on first use, so the converter can use :mod:`.spec` without loading JAX.
"""

import importlib

_EXPORTS = {
    "QuantConfig": "m1_jax.quant.spec", "QuantizeError": "m1_jax.quant.spec",
    "weight_bytes": "m1_jax.quant.layout", "quantize_model": "m1_jax.quant.weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'm1_jax.quant' has no attribute {name!r}")
