"""Policy-gradient objectives for RL on groups of sampled responses: CISPO (the MiniMax-M1 report, section 3),
and the baselines GRPO and DAPO through the same interface, so that the three compare on equal terms.

Every objective is a pure JAX function of per-token arrays ``[batch, time]`` (one row per response; ``time``
over its tokens)::

    loss, metrics = cispo(logprobs, old_logprobs, advantages, mask, ...)

* ``logprobs``: ``log pi_theta(o_t | q, o_<t)`` of the policy being updated (the gradient flows through it);
* ``old_logprobs``: the same tokens under the behaviour policy ``pi_old`` that sampled them (float32, recorded
  by the rollout; never differentiated);
* ``advantages``: one per response ``[batch]`` (shared by its tokens), or one per token ``[batch, time]``;
* ``mask``: 1 on the response tokens that are trained on, 0 on prompt and padding (bool or float).

With ``r = exp(logprobs - old_logprobs)`` the importance ratio, ``sg`` the stop-gradient and ``N`` the number
of response tokens in the batch::

    CISPO (eq. 4-5)  loss = -(1/N) sum_{i,t} sg(clip(r, 1 - eps_low, 1 + eps_high)) * A_i * log pi_theta
                     grad = -(1/N) sum_{i,t} sg(clip(r, ...)) * A_i * grad log pi_theta   (no token is dropped)
    CISPO, token mask (eq. 6-7): the same sum with each term times M_t, where M_t = 0 if A > 0 and
                     r > 1 + mask_eps_high, or A < 0 and r < 1 - mask_eps_low, else 1 (the trust region of
                     PPO written as a mask; off by default)
    PPO surrogate    l_t = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)   (clipped tokens: no gradient)
    GRPO             loss = (1/S) sum_i (1/|o_i|) sum_t l_t     (mean per sequence, then over the S sequences)
    DAPO             loss = (1/N) sum_{i,t} l_t                  (token level; clip-higher 0.2 / 0.28)

An optional KL penalty against a frozen reference policy (``ref_logprobs``, ``kl_coef`` > 0; off by default)
adds ``kl_coef * k3`` to every token's term before the objective's own normalisation, with the unbiased,
non-negative estimator ``k3 = exp(ref - logp) - (ref - logp) - 1`` of KL(pi_theta || pi_ref).

Batches split into micro-batches: pass the whole batch's ``num_tokens`` (token-level objectives) and
``num_sequences`` (GRPO) so that the micro-batch losses sum to the loss of the batch; by default both are
counted from this call's ``mask`` (``num_sequences`` counts the rows holding at least one response token).
Every objective takes both and uses the one its normalisation needs. The hyperparameters (``eps_*``,
``kl_coef``) are Python numbers, fixed when the step is traced.

Metrics (float32 scalars, means over this call's response tokens; ``tokens`` weighs calls when combining):
``clip_fraction`` (ratio outside ``[1 - eps_low, 1 + eps_high]``), ``zero_grad_fraction`` (tokens whose
gradient the clipping removed: PPO's clipped side, CISPO's token mask; 0 for plain CISPO), ``approx_kl``
(KL(pi_old || pi_theta) by ``k3 = r - 1 - log r``), ``ratio_mean``, ``tokens``; ``entropy`` when the caller
passes per-token entropies (:func:`m1_jax.rl.logprobs.token_entropy`), ``ref_kl`` with a reference.

:data:`OBJECTIVES` maps each name to its function and recipe; :func:`make_objective` picks one by name.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

# The log-ratio is clamped to +-LOG_RATIO_LIMIT before exp: a token whose probability moved by more than
# e^20 would otherwise give an infinite ratio and a non-finite loss.
LOG_RATIO_LIMIT = 20.0

# CISPO's upper bound on the importance-sampling weight is 1 + CISPO_EPS_HIGH. The report does not publish
# its value; 0.28 is DAPO's clip-higher bound, so that CISPO and DAPO differ in one thing only: what happens
# to a token past the bound (DAPO drops its gradient, CISPO keeps it with the weight capped at 1.28).
CISPO_EPS_HIGH = 0.28


# ----------------------------------------------------------------------------------- advantages
def group_advantages(rewards: jax.Array, *, eps: float = 1e-6, scale_by_std: bool = True) -> jax.Array:
    """``A_i = (R_i - mean_j R_j) / (std_j R_j + eps)`` within each group: float32 [num_groups, G] from
    rewards [num_groups, G] (row g: the G responses to prompt g). ``std`` is the population standard
    deviation (ddof 0: two responses scoring 0 and 1 get -1 and +1). A group whose rewards are all equal gets
    exactly 0 (no signal, never NaN). ``scale_by_std=False`` gives the centred rewards ``R_i - mean_j R_j``."""
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {r.shape}")
    centred = r - jnp.mean(r, axis=-1, keepdims=True)
    if scale_by_std:
        centred = centred / (jnp.std(r, axis=-1, keepdims=True) + eps)
    constant = jnp.max(r, axis=-1, keepdims=True) == jnp.min(r, axis=-1, keepdims=True)
    return jnp.where(constant, 0.0, centred)


def flat_group_advantages(rewards: jax.Array, group_size: int, *, eps: float = 1e-6,
                          scale_by_std: bool = True) -> jax.Array:
    """:func:`group_advantages` of flat rewards [num_groups * group_size] whose groups are consecutive (rows
    ``g * G .. g * G + G - 1`` answer prompt g) -> float32 [num_groups * group_size]."""
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 1 or group_size < 1 or r.shape[0] % group_size:
        raise ValueError(f"rewards of shape {r.shape} do not split into groups of group_size={group_size}")
    return group_advantages(r.reshape(-1, group_size), eps=eps, scale_by_std=scale_by_std).reshape(-1)


# ----------------------------------------------------------------------------------- shared pieces
@dataclasses.dataclass(frozen=True)
class _Tokens:
    """The inputs of one call, float32, with everything outside the mask set to 0 (padding may hold
    anything, even -inf, without reaching the loss or its gradient)."""

    logp: jax.Array       # [B, T], differentiable
    log_ratio: jax.Array  # [B, T], logp - sg(old), clamped
    adv: jax.Array        # [B, T]
    mask: jax.Array       # [B, T] float32 0/1


def _tokens(logprobs, old_logprobs, advantages, mask) -> _Tokens:
    shape = jnp.shape(logprobs)
    if len(shape) != 2:
        raise ValueError(f"logprobs must be [batch, time], got shape {shape}")
    for name, x in (("old_logprobs", old_logprobs), ("mask", mask)):
        if jnp.shape(x) != shape:
            raise ValueError(f"{name} has shape {jnp.shape(x)}, logprobs {shape}")
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.shape == shape[:1]:
        adv = jnp.broadcast_to(adv[:, None], shape)
    elif adv.shape != shape:
        raise ValueError(f"advantages must be [batch] or [batch, time] = {shape}, got shape {adv.shape}")
    valid = jnp.asarray(mask) > 0
    logp = jnp.where(valid, jnp.asarray(logprobs).astype(jnp.float32), 0.0)
    old = jnp.where(valid, jax.lax.stop_gradient(jnp.asarray(old_logprobs).astype(jnp.float32)), 0.0)
    log_ratio = jnp.clip(logp - old, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return _Tokens(logp=logp, log_ratio=log_ratio, adv=jnp.where(valid, adv, 0.0), mask=valid.astype(jnp.float32))


def _bounds(eps_low: float | None, eps_high: float | None, what: str = "eps") -> tuple[float | None, float | None]:
    """(lower, upper) ratio bounds; None: no bound on that side."""
    for name, e in ((f"{what}_low", eps_low), (f"{what}_high", eps_high)):
        if e is not None and (isinstance(e, bool) or not isinstance(e, (int, float)) or not 0.0 <= e < float("inf")):
            raise ValueError(f"{name} must be None (no bound) or a number >= 0, got {e!r}")
    return (None if eps_low is None else 1.0 - eps_low), (None if eps_high is None else 1.0 + eps_high)


def _outside(ratio, lo, hi):
    out = jnp.zeros(ratio.shape, bool)
    if lo is not None:
        out = out | (ratio < lo)
    if hi is not None:
        out = out | (ratio > hi)
    return out


def _trust_region_cut(ratio, adv, lo, hi):
    """bool [B, T]: PPO's clipped side, where the surrogate is constant in theta (A > 0 and r > hi, or
    A < 0 and r < lo)."""
    cut = jnp.zeros(ratio.shape, bool)
    if hi is not None:
        cut = cut | ((adv > 0) & (ratio > hi))
    if lo is not None:
        cut = cut | ((adv < 0) & (ratio < lo))
    return cut


def _check_kl_coef(kl_coef) -> float:
    if not (isinstance(kl_coef, (int, float)) and 0.0 <= kl_coef < float("inf")):
        raise ValueError(f"kl_coef must be a number >= 0 (0: no KL term), got {kl_coef!r}")
    return kl_coef


def _kl_terms(t: _Tokens, ref_logprobs, kl_coef: float):
    """Per-token ``kl_coef * k3`` against the reference (zeros without one) and the k3 values (or None)."""
    if not _check_kl_coef(kl_coef):
        return jnp.zeros_like(t.logp), None
    if ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs (the frozen reference policy's log-probs)")
    if jnp.shape(ref_logprobs) != t.logp.shape:
        raise ValueError(f"ref_logprobs has shape {jnp.shape(ref_logprobs)}, logprobs {t.logp.shape}")
    ref = jnp.where(t.mask > 0, jax.lax.stop_gradient(jnp.asarray(ref_logprobs).astype(jnp.float32)), 0.0)
    d = jnp.clip(ref - t.logp, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    k3 = (jnp.exp(d) - d - 1.0) * t.mask
    return kl_coef * k3, k3


def _token_mean(x, t: _Tokens, num_tokens):
    n = jnp.maximum(jnp.sum(t.mask), 1.0) if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
    return jnp.sum(x * t.mask) / n


def _sequence_mean(x, t: _Tokens, num_sequences):
    lengths = jnp.sum(t.mask, axis=-1)
    per_seq = jnp.sum(x * t.mask, axis=-1) / jnp.maximum(lengths, 1.0)
    n = (jnp.maximum(jnp.sum((lengths > 0).astype(jnp.float32)), 1.0) if num_sequences is None
         else jnp.asarray(num_sequences, jnp.float32))
    return jnp.sum(per_seq) / n


def _metrics(t: _Tokens, ratio, lo, hi, zero_grad, entropy, k3) -> dict[str, jax.Array]:
    sg = jax.lax.stop_gradient
    ratio, n = sg(ratio), jnp.maximum(jnp.sum(t.mask), 1.0)

    def mean(x):
        return jnp.sum(jnp.where(t.mask > 0, x, 0.0)) / n

    log_ratio = sg(t.log_ratio)
    out = {"clip_fraction": mean(_outside(ratio, lo, hi).astype(jnp.float32)),
           "zero_grad_fraction": mean(zero_grad.astype(jnp.float32)),
           "approx_kl": mean(ratio - 1.0 - log_ratio),
           "ratio_mean": mean(ratio),
           "tokens": jnp.sum(t.mask)}
    if entropy is not None:
        out["entropy"] = mean(sg(jnp.asarray(entropy, jnp.float32)))
    if k3 is not None:
        out["ref_kl"] = mean(sg(k3))
    return out


def _ppo(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, ref_logprobs, kl_coef, entropy, normalise):
    """PPO's clipped surrogate ``-min(r * A, clip(r, lo, hi) * A)`` per token (plus the KL term), reduced by
    ``normalise(per_token, tokens)``: what GRPO and DAPO share -> (loss, metrics)."""
    lo, hi = _bounds(eps_low, eps_high)
    t = _tokens(logprobs, old_logprobs, advantages, mask)
    ratio = jnp.exp(t.log_ratio)
    surrogate = jnp.minimum(ratio * t.adv, jnp.clip(ratio, lo, hi) * t.adv)
    kl, k3 = _kl_terms(t, ref_logprobs, kl_coef)
    return normalise(kl - surrogate, t), _metrics(t, ratio, lo, hi, _trust_region_cut(ratio, t.adv, lo, hi),
                                                  entropy, k3)


# ----------------------------------------------------------------------------------- the objectives
def cispo(logprobs, old_logprobs, advantages, mask, *, eps_low: float | None = None,
          eps_high: float | None = CISPO_EPS_HIGH, mask_eps_low: float | None = None,
          mask_eps_high: float | None = None, ref_logprobs=None, kl_coef: float = 0.0, entropy=None,
          num_tokens=None, num_sequences=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CISPO, the report's eq. 4-5 (module docstring): the stop-gradient, clipped importance-sampling weight
    times the advantage times ``log pi_theta``, summed over all response tokens and divided by their number.

    ``eps_low``: None (the default) puts no lower bound on the weight, as the report does (it sets eps_low
    "large"; since ``r > 0``, any ``eps_low >= 1`` is the same). ``eps_high``: the weight is at most
    ``1 + eps_high`` (default :data:`CISPO_EPS_HIGH`; None: no upper bound). ``mask_eps_low`` /
    ``mask_eps_high``: the token mask of eq. 6-7 (None: that side of the mask is off; both None, the default,
    is eq. 4-5). ``num_sequences`` is accepted for a uniform interface and unused (token-level)."""
    del num_sequences
    lo, hi = _bounds(eps_low, eps_high)
    mlo, mhi = _bounds(mask_eps_low, mask_eps_high, "mask_eps")
    t = _tokens(logprobs, old_logprobs, advantages, mask)
    ratio = jnp.exp(t.log_ratio)
    weight = jax.lax.stop_gradient(jnp.clip(ratio, lo, hi))
    cut = _trust_region_cut(ratio, t.adv, mlo, mhi)
    per_token = -jnp.where(cut, 0.0, weight * t.adv * t.logp)
    kl, k3 = _kl_terms(t, ref_logprobs, kl_coef)
    loss = _token_mean(per_token + kl, t, num_tokens)
    return loss, _metrics(t, ratio, lo, hi, cut, entropy, k3)


def grpo(logprobs, old_logprobs, advantages, mask, *, eps_low: float | None = 0.2, eps_high: float | None = 0.2,
         ref_logprobs=None, kl_coef: float = 0.0, entropy=None, num_tokens=None,
         num_sequences=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO: PPO's clipped surrogate (symmetric 0.2), averaged over each response's tokens, then over the
    responses (``num_sequences``). ``num_tokens`` is accepted for a uniform interface and unused."""
    del num_tokens
    return _ppo(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, ref_logprobs, kl_coef, entropy,
                lambda x, t: _sequence_mean(x, t, num_sequences))


def dapo(logprobs, old_logprobs, advantages, mask, *, eps_low: float | None = 0.2, eps_high: float | None = 0.28,
         ref_logprobs=None, kl_coef: float = 0.0, entropy=None, num_tokens=None,
         num_sequences=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DAPO: PPO's clipped surrogate with clip-higher (0.2 below, 0.28 above), summed over all response tokens
    and divided by their number (``num_tokens``). Its dynamic sampling is a rollout filter
    (:func:`m1_jax.rl.rollout_filters.informative_groups`). ``num_sequences`` is accepted and unused."""
    del num_sequences
    return _ppo(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, ref_logprobs, kl_coef, entropy,
                lambda x, t: _token_mean(x, t, num_tokens))


# ----------------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Objective:
    """One entry of :data:`OBJECTIVES`: the loss function, how it normalises (``"token"``: by the batch's
    response tokens; ``"sequence"``: per response, then by the number of responses), and whether its recipe
    drops groups whose rewards are all equal (``dynamic_sampling``; the loop's default for that option)."""

    fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    normalisation: str
    dynamic_sampling: bool

    @property
    def options(self) -> dict[str, object]:
        """The hyperparameters the function takes, with their defaults (``eps_low``, ``eps_high``, ...)."""
        return {n: p.default for n, p in inspect.signature(self.fn).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _CALL_ARGUMENTS}


# Keyword arguments that come with the data of each call, not from the run config.
_CALL_ARGUMENTS = ("ref_logprobs", "entropy", "num_tokens", "num_sequences")

OBJECTIVES: Mapping[str, Objective] = {
    "cispo": Objective(cispo, "token", dynamic_sampling=False),
    "grpo": Objective(grpo, "sequence", dynamic_sampling=False),
    "dapo": Objective(dapo, "token", dynamic_sampling=True),
}


def make_objective(name: str, **options) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """The objective called ``name`` in :data:`OBJECTIVES` with its hyperparameters set from ``options``
    (e.g. ``make_objective("cispo", eps_high=2.0)``); the result is called as
    ``fn(logprobs, old_logprobs, advantages, mask, ref_logprobs=..., entropy=..., num_tokens=...,
    num_sequences=...)``. An unknown name or option raises ValueError naming it and the choices."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective {name!r} is not one of {', '.join(OBJECTIVES)}")
    entry = OBJECTIVES[name]
    known = entry.options
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"objective {name!r} has no option {', '.join(map(repr, unknown))} "
                         f"(its options: {', '.join(known)})")
    settings = {**known, **options}
    _bounds(settings["eps_low"], settings["eps_high"])
    if "mask_eps_high" in settings:
        _bounds(settings["mask_eps_low"], settings["mask_eps_high"], "mask_eps")
    _check_kl_coef(settings["kl_coef"])
    return functools.partial(entry.fn, **options)
