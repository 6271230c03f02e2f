"""MiniMax-M1 / MiniMax-Text-01 in JAX and Flax NNX."""

from m1_jax.cache import Cache, CacheError, init_cache
from m1_jax.config import ConfigError, M1Config, param_counts
from m1_jax.convert.safetensors_io import CheckpointError
from m1_jax.loading import from_pretrained
from m1_jax.model import M1Model, abstract_model, init_model
from m1_jax.generate import Generation, decode_step, generate, prefill

__all__ = ["Cache", "CacheError", "CheckpointError", "ConfigError", "Generation", "M1Config", "M1Model",
           "abstract_model", "decode_step", "from_pretrained", "generate", "init_cache", "init_model", "param_counts",
           "prefill"]
__version__ = "0.1.0"
