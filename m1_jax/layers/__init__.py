"""Flax NNX building blocks of MiniMax-M1, one module per layer kind."""

from m1_jax.layers.attention import SoftmaxAttention
from m1_jax.layers.decoder import DecoderLayer, Period
from m1_jax.layers.lightning import LightningAttention
from m1_jax.layers.moe import MoE
from m1_jax.layers.norms import RMSNorm
from m1_jax.layers.rope import apply_rope

__all__ = ["SoftmaxAttention", "DecoderLayer", "Period", "LightningAttention", "MoE", "RMSNorm", "apply_rope"]
