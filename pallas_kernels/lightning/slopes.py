"""Per-head decay slopes of MiniMax-M1's lightning attention (docs/model.md §2.5).

slope[h] = alibi(H)[h] * (1 - l / (L - 1) + 1e-5), where alibi(H) is the ALiBi
slope list of the original code (2^(-8(h+1)/H) when H is a power of two, the
ALiBi interleave otherwise). For L == 1 the layer factor is 1 + 1e-5.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["alibi_slopes", "m1_slopes"]


def _slopes_power_of_2(n: int) -> list[float]:
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start * start**i for i in range(n)]


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes as in the original `get_slopes` (float64 list)."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if math.log2(num_heads).is_integer():
        return _slopes_power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return _slopes_power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def m1_slopes(num_heads: int, layer_idx: int, num_layers: int) -> np.ndarray:
    """Float32 [num_heads] decay slopes of global layer `layer_idx` of `num_layers`."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be in [0, {num_layers}), got {layer_idx}")
    if num_layers == 1:
        factor = 1.0 + 1e-5
    else:
        factor = 1.0 - layer_idx / (num_layers - 1) + 1e-5
    base = np.asarray(alibi_slopes(num_heads), dtype=np.float64)
    return (base * factor).astype(np.float32)
