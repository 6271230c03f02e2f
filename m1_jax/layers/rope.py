"""Partial NeoX-style rotary embedding: only the first ``rotary_dim`` dims of each head rotate.

Pairs are ``(i, i + rotary_dim/2)`` (rotate_half), not interleaved ``(2i, 2i+1)``; the rotation is
done in float32 and cast once, as in the original code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_cos_sin(positions: jax.Array, rotary_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape ``positions.shape + (rotary_dim,)`` in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, positions: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
    """Rotates ``x[..., :rotary_dim]`` of ``x`` [batch, time, heads, head_dim] by ``positions`` [batch, time]."""
    cos, sin = rope_cos_sin(positions, rotary_dim, theta)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rot = x[..., :rotary_dim].astype(jnp.float32)
    half = rotary_dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = (rot * cos + rotated * sin).astype(x.dtype)
    return jnp.concatenate([out, x[..., rotary_dim:]], axis=-1) if rotary_dim < x.shape[-1] else out
