"""MiniMax-M1 / MiniMax-Text-01 in JAX and Flax NNX.

The public names below are imported on first use, so importing a light submodule (the config, the
checkpoint readers) or starting the ``m1`` command line does not load JAX until it is needed.
"""

from m1_jax.lazy import lazy_attributes

# public name -> module that defines it
_EXPORTS = {
    "Cache": "m1_jax.cache", "CacheError": "m1_jax.cache", "init_cache": "m1_jax.cache",
    "ConfigError": "m1_jax.config", "M1Config": "m1_jax.config", "param_counts": "m1_jax.config",
    "CheckpointError": "m1_jax.checkpoint_io.errors",
    "from_pretrained": "m1_jax.loading",
    "M1Model": "m1_jax.model", "abstract_model": "m1_jax.model", "init_model": "m1_jax.model",
    "Generation": "m1_jax.generation", "decode_step": "m1_jax.generation", "generate": "m1_jax.generation",
    "prefill": "m1_jax.generation", "stream": "m1_jax.generation",
    "ModelOutput": "m1_jax.model",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

__getattr__ = lazy_attributes(__name__, _EXPORTS, globals())


def __dir__():
    return sorted(list(globals()) + __all__)

