"""Rollouts: ``group_size`` sampled responses per prompt, batched through :func:`m1_jax.generate`, laid out
as the policy update's batch (:mod:`m1_jax.rl.update`).

Rows: the ``G`` responses to prompt ``g`` are rows ``g * G .. g * G + G - 1`` (``group[n] = n // G``), the
layout of :func:`m1_jax.rl.objectives.flat_group_advantages`. Row ``n`` with prompt length ``p`` and response
length ``l``::

    tokens[n]         = prompt + response + PAD ...          int32   [N, L]
    response_mask[n]  = 0 (p times), 1 (l times), 0 ...       float32 [N, L]
    logprobs[n, t]    = log pi_old(tokens[n, t] | tokens[n, :t]) where response_mask[n, t] = 1, else 0

``logprobs`` are the sampling model's log-softmax at temperature 1 (whatever ``temperature`` / ``top_p``
sampled with), float32: the behaviour log-probs the objectives' importance ratio divides by. The response
holds the stopping token (eos or the end of a stop sequence) when one was sampled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from m1_jax.generation import as_batch, generate
from m1_jax.model import M1Model

PAD = 0  # the token id after each row's response (masked out everywhere)


@dataclasses.dataclass
class Rollout:
    """Sampled responses in the update's layout (module docstring); NumPy arrays, ``N = prompts * G`` rows."""

    tokens: np.ndarray            # int32 [N, L]
    response_mask: np.ndarray     # float32 [N, L]
    logprobs: np.ndarray          # float32 [N, L]
    prompt_lengths: np.ndarray    # int32 [N]
    response_lengths: np.ndarray  # int32 [N]
    group: np.ndarray             # int32 [N]: the prompt each row answers
    group_size: int

    def response(self, n: int) -> np.ndarray:
        """Row ``n``'s response tokens (what a reward scores)."""
        p = int(self.prompt_lengths[n])
        return self.tokens[n, p: p + int(self.response_lengths[n])]

    def responses(self) -> list[list[int]]:
        return [self.response(n).tolist() for n in range(self.tokens.shape[0])]


def rollout(model: M1Model, prompts, *, group_size: int, max_new_tokens: int, temperature: float = 1.0,
            top_p: float | None = None, seed: int = 0, eos_token_id: int | Sequence[int] | None = None,
            stop: Sequence[Sequence[int] | int] | None = None, length: int | None = None) -> Rollout:
    """``group_size`` responses of up to ``max_new_tokens`` to each of ``prompts`` (a list of token-id lists,
    different lengths allowed), sampled in one :func:`m1_jax.generate` batch of ``len(prompts) * group_size``
    rows. ``length``: the rows' length L (default: the longest prompt + ``max_new_tokens``; a fixed value
    keeps the update's compiled shape across rollouts)."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    ids, lens = as_batch(prompts)
    ids, lens = np.repeat(ids, group_size, axis=0), np.repeat(lens, group_size)
    need = int(lens.max()) + max_new_tokens
    L = need if length is None else int(length)
    if L < need:
        raise ValueError(f"length={length} is shorter than the longest prompt ({int(lens.max())} tokens) plus "
                         f"max_new_tokens={max_new_tokens}")
    out = generate(model, ids, lengths=lens, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   seed=seed, eos_token_id=eos_token_id, stop=stop, return_logprobs=True)
    new, count, lp = (np.asarray(x) for x in (out.tokens, out.num_tokens, out.logprobs))
    N = ids.shape[0]
    tokens = np.full((N, L), PAD, np.int32)
    mask = np.zeros((N, L), np.float32)
    logprobs = np.zeros((N, L), np.float32)
    for n in range(N):
        p, r = int(lens[n]), int(count[n])
        tokens[n, :p] = ids[n, :p]
        tokens[n, p: p + r] = new[n, :r]
        mask[n, p: p + r] = 1.0
        logprobs[n, p: p + r] = lp[n, :r]
    return Rollout(tokens=tokens, response_mask=mask, logprobs=logprobs, prompt_lengths=lens.astype(np.int32),
                   response_lengths=count.astype(np.int32), group=np.arange(N, dtype=np.int32) // group_size,
                   group_size=int(group_size))


def to_update_batch(r: Rollout, advantages) -> dict[str, np.ndarray]:
    """The update's batch (:mod:`m1_jax.rl.update`) of rollout ``r`` and one advantage per row ``[N]``."""
    adv = np.asarray(advantages, np.float32)
    if adv.shape != r.tokens.shape[:1]:
        raise ValueError(f"advantages must have one value per rollout row, shape ({r.tokens.shape[0]},), "
                         f"got {adv.shape}")
    return {"tokens": r.tokens, "loss_mask": r.response_mask, "old_logprobs": r.logprobs, "advantages": adv}
