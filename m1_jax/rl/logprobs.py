"""Per-token statistics of a policy, from its logits: the log-probability of each chosen token and the
entropy of each position's distribution, float32 whatever the logits' dtype.

``logits[:, t]`` is the distribution that ``targets[:, t]`` was drawn from (the caller shifts the model's
logits by one position against its input tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``log softmax(logits)[b, t, targets[b, t]]``: float32 [batch, time] from logits [batch, time, vocab]."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def token_entropy(logits: jax.Array) -> jax.Array:
    """``H_t = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v`` with ``p = softmax(z)``, float32
    [batch, time] from logits ``z`` [batch, time, vocab] (0 for a one-hot distribution, log V for a uniform one)."""
    logits = logits.astype(jnp.float32)
    p = jax.nn.softmax(logits, axis=-1)
    finite = jnp.where(p > 0, logits, 0.0)  # masked-out entries (-inf) add 0, not 0 * inf, to value and gradient
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(p * finite, axis=-1)
