"""int8 weights: what is quantized and how (:mod:`.spec`, no JAX), the arrays a quantized model stores
(:mod:`.layout`, no JAX), and quantizing a model in place (:mod:`.weights`). The matmuls on int8 weights
live with the layers: :func:`m1_jax.layers.common.matmul` (attention projections, through qwix) and
:mod:`m1_jax.layers.experts` (the routed experts' grouped matmuls). docs/quantization.md describes it all.

The names below are imported on first use, so the converter can use :mod:`.spec` without loading JAX.
"""

from m1_jax.lazy import lazy_attributes

_EXPORTS = {
    "QuantConfig": "m1_jax.quant.spec", "QuantizeError": "m1_jax.quant.spec",
    "weight_bytes": "m1_jax.quant.layout", "quantize_model": "m1_jax.quant.weights",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_attributes(__name__, _EXPORTS, globals())
