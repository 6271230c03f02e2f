"""Which weights are stored in int8 and how (no JAX: the converter and ``m1 info`` use it too).

Weight-only int8, symmetric, one float32 scale per output channel: a weight ``W`` whose first ``c`` axes
(after any stacked axes: periods, experts) are contracted by its matmul is stored as ``q = round(W / s)``
clipped to [-127, 127] (int8) and ``s = max|W| / 127`` over the contracted axes (float32, the weight's
shape without them). Because ``s`` is constant along the contraction, ``x @ W = (x @ q) * s`` exactly: the
matmuls run on the int8 values (converted to the compute dtype as they are read) and scale their output.

What is quantized (:class:`QuantConfig`): the routed experts' ``w1``, ``w3``, ``w2`` (about 95% of M1's
parameters) always; the attention projections (lightning ``qkv_proj``, ``output_gate``, ``out_proj``;
softmax ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) with ``attention=True``. The embedding, norms,
router and output head are never quantized. In the model's state a quantized weight keeps its name
(int8 values) and gains a sibling ``NAME_scale`` (:func:`scale_path`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

INT8 = "int8"
QMAX = 127
SCALE_SUFFIX = "_scale"
# 1 / 127 as float32: the scale is max|W| times this in numpy and in XLA alike, so a weight quantized on load
# (m1_jax.quant.apply) is bit-identical to the same weight quantized by ``m1 convert --quantize int8``.
INV_QMAX = np.float32(1.0 / QMAX)

# Parameter (relative to a decoder layer) -> number of leading axes its matmul contracts.
EXPERT_WEIGHTS = {"block_sparse_moe.w1": 1, "block_sparse_moe.w3": 1, "block_sparse_moe.w2": 1}
ATTENTION_WEIGHTS = {
    "self_attn.qkv_proj": 1, "self_attn.output_gate": 1, "self_attn.out_proj": 2,  # lightning
    "self_attn.q_proj": 1, "self_attn.k_proj": 1, "self_attn.v_proj": 1, "self_attn.o_proj": 2,  # softmax
}


class QuantizeError(ValueError):
    """A quantization option the model does not have (the message names the argument or flag)."""


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """int8 weights: the experts always, the attention projections when ``attention``."""

    attention: bool = False

    @property
    def name(self) -> str:
        return INT8

    def contracted(self, name: str) -> int | None:
        """Leading contracted axes of the layer parameter ``name`` (``block_sparse_moe.w1``), None if it stays
        in floating point."""
        if name in EXPERT_WEIGHTS:
            return EXPERT_WEIGHTS[name]
        if self.attention and name in ATTENTION_WEIGHTS:
            return ATTENTION_WEIGHTS[name]
        return None

    def to_dict(self) -> dict:
        return {"weights": INT8, "attention": self.attention}

    @classmethod
    def from_dict(cls, d: dict | None) -> QuantConfig | None:
        if not d:
            return None
        return cls(attention=bool(d.get("attention", False)))


def resolve(quantize, attention: bool | None = None, *, argument: str = "quantize") -> QuantConfig | None:
    """``None`` / ``"none"`` (full precision), ``"int8"`` or a :class:`QuantConfig` -> a config or None;
    ``attention`` (when not None) sets whether the attention projections are quantized too."""
    if isinstance(quantize, QuantConfig):
        return quantize if attention is None else dataclasses.replace(quantize, attention=attention)
    if quantize is None or quantize == "none":
        if attention:
            raise QuantizeError(f"quantizing the attention projections needs {argument}='int8'")
        return None
    if quantize != INT8:
        raise QuantizeError(f"{argument} must be None or 'int8', got {quantize!r}")
    return QuantConfig(attention=bool(attention))


def layer_param(path: tuple) -> str | None:
    """``("periods", "layers", 3, "block_sparse_moe", "w1")`` -> ``"block_sparse_moe.w1"`` (None for a path
    outside the decoder layers)."""
    if len(path) < 4 or path[:2] != ("periods", "layers"):
        return None
    return ".".join(map(str, path[3:]))


def scale_path(path: tuple) -> tuple:
    """The state path of the scales of the quantized weight at ``path``."""
    return path[:-1] + (str(path[-1]) + SCALE_SUFFIX,)


def scale_shape(shape: tuple[int, ...], stacked: int, contracted: int) -> tuple[int, ...]:
    """The weight's shape without its contracted axes (the ``contracted`` axes after ``stacked`` ones)."""
    return tuple(shape[:stacked]) + tuple(shape[stacked + contracted:])


def quantize(w, stacked: int, contracted: int, xp=np):
    """``w`` (floating, any layout whose contracted axes follow ``stacked`` stacked axes) -> (int8 values,
    float32 scales of :func:`scale_shape`). ``xp``: ``numpy`` or ``jax.numpy`` (the same arithmetic, the
    same bits)."""
    w = w.astype(xp.float32)
    axes = tuple(range(stacked, stacked + contracted))
    amax = xp.max(xp.abs(w), axis=axes, keepdims=True)
    s = amax * INV_QMAX
    inv = xp.where(s > 0, xp.float32(1.0) / xp.where(s > 0, s, xp.float32(1.0)), xp.float32(0.0))
    q = xp.clip(xp.round(w * inv), -QMAX, QMAX).astype(xp.int8)
    return q, xp.squeeze(s, axis=axes)


def dequantize(q, s, stacked: int, contracted: int, xp=np):
    """float32 ``q * s`` (the weight the int8 values stand for)."""
    return q.astype(xp.float32) * xp.expand_dims(s, tuple(range(stacked, stacked + contracted)))
