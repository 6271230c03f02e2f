"""LoRA adapters: which weights and how (:mod:`.spec`, no JAX) and adding and merging them (:mod:`.adapters`);
``m1 export`` writes them merged or as a Hugging Face PEFT adapter (:mod:`m1_jax.convert.export`). The
layers apply them in their matmuls (:func:`m1_jax.layers.common.matmul`, :mod:`m1_jax.layers.experts`).
docs/lora.md describes it all.

The names below are imported on first use, so run configs and the CLI can use :mod:`.spec` without JAX.
"""

from m1_jax.lazy import lazy_attributes

_EXPORTS = {
    "LoraConfig": "m1_jax.lora.spec", "LoraError": "m1_jax.lora.spec",
    "LoraParam": "m1_jax.lora.adapters", "add_adapters": "m1_jax.lora.adapters",
    "merge_adapters": "m1_jax.lora.adapters", "adapter_count": "m1_jax.lora.adapters",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_attributes(__name__, _EXPORTS, globals())
