"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), all on float32 logits.

The knobs are traced values (changing them compiles nothing new); only greedy vs. sampling is static.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


class SamplingArgumentError(ValueError):
    """A sampling parameter out of range. ``argument`` names it as :meth:`SamplingParams.create` spells it
    (``temperature``, ``top_k``, ``top_p``); the message is ``f"{argument} {problem}"``."""

    def __init__(self, argument: str, problem: str):
        super().__init__(f"{argument} {problem}")
        self.argument = argument
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0      # 0: off
    top_p: float = 1.0  # 1: off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def create(cls, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               vocab_size: int | None = None) -> "SamplingParams":
        """Validated parameters: ``temperature`` >= 0 (0: greedy), ``top_k`` >= 0 (None or 0: off; capped at
        ``vocab_size``), ``top_p`` in (0, 1] (None or 1: off). The one validation of sampling parameters,
        for the library and the command line alike: a bad value raises :class:`SamplingArgumentError`
        naming the argument."""
        try:
            temperature = float(temperature)
        except (TypeError, ValueError):
            raise SamplingArgumentError("temperature", f"must be a finite number >= 0, got {temperature!r}") from None
        if not 0.0 <= temperature < float("inf"):
            raise SamplingArgumentError("temperature", f"must be a finite number >= 0, got {temperature}")
        if top_k is None:
            top_k = 0
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise SamplingArgumentError("top_k", f"must be an integer >= 0 (0: off), got {top_k!r}")
        if vocab_size is not None:
            top_k = min(top_k, vocab_size)
        if top_p is None:
            top_p = 1.0
        try:
            top_p = float(top_p)
        except (TypeError, ValueError):
            raise SamplingArgumentError("top_p", f"must be in (0, 1], got {top_p!r}") from None
        if not 0.0 < top_p <= 1.0:
            raise SamplingArgumentError("top_p", f"must be in (0, 1], got {top_p}")
        return cls(temperature, top_k, top_p)

    def arrays(self):
        return (jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p))


def filter_logits(logits: jax.Array, top_k, top_p) -> jax.Array:
    """Sets to -inf what top-k (0 = off) and top-p (1 = off) exclude; [batch, vocab] float32.

    ``top_k`` / ``top_p``: one value for every row, or one per row ([batch])."""
    B, V = logits.shape
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (B,))[:, None]
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (B,))[:, None]
    rank = jnp.arange(V)[None]
    srt = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)  # [B, 1]
    kth = jnp.take_along_axis(srt, k - 1, axis=-1)
    probs = jax.nn.softmax(jnp.where(rank < k, srt, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
    keep = (before < top_p) & (rank < k)
    # the smallest kept logit; the best token is always kept
    thresh = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    thresh = jnp.maximum(jnp.minimum(thresh, srt[:, :1]), kth)
    return jnp.where(logits >= thresh, logits, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, temperature, top_k, top_p, *, greedy: bool) -> jax.Array:
    """int32 [batch] next tokens from float32 ``logits`` [batch, vocab]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.astype(jnp.float32) / temperature
    x = filter_logits(x, top_k, top_p)
    keys = jax.random.split(key, logits.shape[0])
    return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """int32 [batch] next tokens with each row's own parameters (a serving batch mixes requests).

    ``keys``: one random key per row; ``temperature`` / ``top_k`` / ``top_p``: [batch] each. A row with
    temperature 0 takes the argmax; the others sample as :func:`sample` does."""
    logits = logits.astype(jnp.float32)
    hot = temperature > 0
    x = filter_logits(logits / jnp.where(hot, temperature, 1.0)[:, None], top_k, top_p)
    drawn = jax.vmap(jax.random.categorical)(keys, x)
    return jnp.where(hot, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
