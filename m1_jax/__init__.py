"""MiniMax-M1 / MiniMax-Text-01 in JAX and Flax NNX."""

from m1_jax.config import ConfigError, M1Config, param_counts
from m1_jax.convert.safetensors_io import CheckpointError
from m1_jax.loading import from_pretrained
from m1_jax.model import M1Model, abstract_model, init_model

__all__ = ["CheckpointError", "ConfigError", "M1Config", "M1Model", "abstract_model", "from_pretrained",
           "init_model", "param_counts"]
__version__ = "0.1.0"
