"""MiniMax-M1 / MiniMax-Text-01 in JAX and Flax NNX.

The public names below are imported on first use, so importing a light submodule (the config, the
checkpoint readers) or starting the ``m1`` command line does not load JAX until it is needed.
"""

import importlib
import sys
import types

# public name -> module that defines it
_EXPORTS = {
    "Cache": "m1_jax.cache", "CacheError": "m1_jax.cache", "init_cache": "m1_jax.cache",
    "ConfigError": "m1_jax.config", "M1Config": "m1_jax.config", "param_counts": "m1_jax.config",
    "CheckpointError": "m1_jax.checkpoint_io.errors",
    "from_pretrained": "m1_jax.loading",
    "M1Model": "m1_jax.model", "abstract_model": "m1_jax.model", "init_model": "m1_jax.model",
    "Generation": "m1_jax.generate", "decode_step": "m1_jax.generate", "generate": "m1_jax.generate",
    "prefill": "m1_jax.generate",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'm1_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)


class _Package(types.ModuleType):
    """Keeps ``m1_jax.generate`` the function: importing the submodule of that name would rebind it."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return  # the submodule stays reachable through sys.modules and ``from m1_jax.generate import ...``
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
