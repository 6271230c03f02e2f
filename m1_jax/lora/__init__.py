"""LoRA adapters: which weights and how (:mod:`.spec`, no JAX), adding and merging them (:mod:`.adapters`),
and writing them as a Hugging Face PEFT adapter (:mod:`.peft_export`). The layers apply them in their
matmuls (:func:`m1_jax.layers.common.matmul`, :mod:`m1_jax.layers.experts`). docs/lora.md describes it all.

The names below are imported on first use, so run configs and the CLI can use :mod:`.spec` without JAX.
"""

import importlib

_EXPORTS = {
    "LoraConfig": "m1_jax.lora.spec", "LoraError": "m1_jax.lora.spec",
    "LoraParam": "m1_jax.lora.adapters", "add_adapters": "m1_jax.lora.adapters",
    "merge_adapters": "m1_jax.lora.adapters", "adapter_count": "m1_jax.lora.adapters",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'm1_jax.lora' has no attribute {name!r}")
