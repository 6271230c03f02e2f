"""The RL policy update: one jit-compiled, sharded step ``(state, batch) -> (state, metrics)`` that applies a
policy-gradient objective (:data:`m1_jax.rl.objectives.OBJECTIVES`) to a batch of sampled responses.

Batch layout (one row per response, ``[B, T]`` right-padded; :func:`m1_jax.rl.rollout.to_update_batch`)::

    tokens        int32   [B, T]  prompt + response + padding
    loss_mask     float32 [B, T]  1 where tokens[b, t] is a response token to train on (so loss_mask[:, 0] = 0)
    old_logprobs  float32 [B, T]  log pi_old(tokens[b, t] | tokens[b, :t]) at those positions (0 elsewhere)
    advantages    float32 [B]     one per response, shared by its tokens
    ref_logprobs  float32 [B, T]  optional: the reference policy's, for an objective with ``kl_coef > 0``

Position ``t`` is predicted by the logits at ``t - 1``: the step runs the model over ``tokens``, takes
``logprobs[:, t] = log softmax(logits[:, t - 1])[tokens[:, t]]`` (float32, :func:`token_logprobs`) for
``t >= 1`` and calls the objective on the ``[B, T - 1]`` arrays of positions ``1 .. T - 1``. The objective
is normalised over the whole batch (``num_tokens``: its response tokens; ``num_sequences``: its responses with
at least one), also when the batch is split into micro-batches, so accumulation gives the batch's gradient.

The state is the train state's ``(model, optimizer)`` (:func:`m1_jax.train.model_and_optimizer`), placed on
the mesh by the same rules, with the batch rows split over its batch axes. The optimizer update is applied
only where the loss and the gradient norm are finite (:func:`m1_jax.train.update_if`; ``ok`` is 0 otherwise).
Metrics: the objective's (token means over the batch), ``loss``, ``grad_norm``, ``lr``, ``ok``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from m1_jax import sharding
from m1_jax.model import M1Model
from m1_jax.rl.logprobs import token_entropy, token_logprobs
from m1_jax.rl.objectives import make_objective
from m1_jax.run_config import OptimizerSection
from m1_jax.train import (PlacedModelState, accumulate_grads, jit_step, learning_rate_schedule, make_optimizer,
                          placed_state, update_if)

UPDATE_KEYS = ("tokens", "loss_mask", "old_logprobs", "advantages", "ref_logprobs")

# AdamW settings of the MiniMax-M1 report's RL: beta2 0.95 and eps 1e-15, since its gradients are tiny
# (an eps of 1e-8 would swamp the second-moment estimate and shrink the steps).
RL_ADAMW = {"b1": 0.9, "b2": 0.95, "eps": 1e-15}


def rl_optimizer_section(**fields) -> OptimizerSection:
    """An :class:`OptimizerSection` with :data:`RL_ADAMW` (AdamW beta1 0.9, beta2 0.95, eps 1e-15) over its
    defaults, then ``fields`` (e.g. ``lr=1e-6, warmup_steps=0``) over both."""
    return OptimizerSection(**{**RL_ADAMW, **fields})


def policy_logprobs(model: M1Model, tokens: jax.Array, *, remat: str = "none") -> tuple[jax.Array, jax.Array]:
    """(log-probs, entropies), float32 [B, T - 1]: of ``tokens[:, 1:]`` under the model run over ``tokens``
    [B, T], and of the distribution each was drawn from."""
    logits = model.forward(tokens, remat=remat).logits[:, :-1]
    return token_logprobs(logits, tokens[:, 1:]), token_entropy(logits)


def update_step_fn(graphdef, objective: Callable, schedule: optax.Schedule, *, micro_batches: int = 1,
                   remat: str = "none"):
    """The pure step ``(state, batch) -> (state, metrics)`` with ``objective`` from
    :func:`m1_jax.rl.objectives.make_objective`."""

    def step(state, batch):
        old_leaves, treedef = jax.tree.flatten(state)  # before merge: the update mutates the variables
        model, optimizer = nnx.merge(graphdef, state)
        mgraph, params, rest = nnx.split(model, nnx.Param, ...)
        mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
        num_tokens = jnp.maximum(jnp.sum(mask), 1.0)
        num_sequences = jnp.maximum(jnp.sum((jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)), 1.0)

        def loss_fn(p, mb):
            logp, entropy = policy_logprobs(nnx.merge(mgraph, p, rest), mb["tokens"], remat=remat)
            ref = mb.get("ref_logprobs")
            loss, metrics = objective(logp, mb["old_logprobs"][:, 1:], mb["advantages"], mb["loss_mask"][:, 1:],
                                      ref_logprobs=None if ref is None else ref[:, 1:], entropy=entropy,
                                      num_tokens=num_tokens, num_sequences=num_sequences)
            # The objective's metrics are means over this micro-batch's tokens: weighted by them, they sum
            # to the batch's means.
            n = metrics["tokens"]
            sums = {k: (v if k == "tokens" else v * n / num_tokens) for k, v in metrics.items()}
            return loss, dict(sums, loss=loss)

        grads, sums = accumulate_grads(loss_fn, params, batch, micro_batches)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
        new_state = update_if(ok, graphdef, old_leaves, treedef, grads)
        metrics = dict(sums, grad_norm=grad_norm, lr=schedule(optimizer.step[...]), ok=ok.astype(jnp.int32))
        return new_state, metrics

    return step


def update_batch_shardings(mesh: Mesh, keys) -> dict[str, NamedSharding]:
    """Rows of every batch array split over the mesh's batch axes ([B, T] arrays, and [B] advantages)."""
    spec = {k: ("batch",) if k == "advantages" else ("batch", "length") for k in keys}
    return {k: NamedSharding(mesh, sharding.logical_to_spec(v, mesh)) for k, v in spec.items()}


@dataclasses.dataclass(frozen=True)
class UpdateOptions:
    """``objective``: a name in :data:`OBJECTIVES`, with ``objective_options`` (e.g. ``{"eps_high": 2.0}``);
    ``micro_batches``: gradient accumulation over that many slices of the batch; ``remat`` as in training."""

    objective: str = "cispo"
    objective_options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    micro_batches: int = 1
    remat: str = "none"


class PolicyState(PlacedModelState):
    """The policy being trained: ``model`` (copied, not changed) and its optimizer ``tx`` placed on ``mesh``
    (:func:`m1_jax.sharding.make_mesh`; one device is a mesh too), and the compiled update step."""

    def __init__(self, model: M1Model, tx: optax.GradientTransformation, mesh: Mesh, opts: UpdateOptions,
                 schedule: optax.Schedule, *, with_ref: bool = False, compiler_options: dict | None = None):
        if isinstance(opts.micro_batches, bool) or not isinstance(opts.micro_batches, int) or opts.micro_batches < 1:
            raise ValueError(f"micro_batches must be a positive integer, got {opts.micro_batches!r}")
        self.mesh = mesh
        self.opts = opts
        self.graphdef, self.state, self.state_shardings = placed_state(model, tx, mesh)
        keys = UPDATE_KEYS if with_ref else UPDATE_KEYS[:-1]
        self.batch_shardings = update_batch_shardings(mesh, keys)
        objective = make_objective(opts.objective, **dict(opts.objective_options))
        step = update_step_fn(self.graphdef, objective, schedule, micro_batches=opts.micro_batches, remat=opts.remat)
        self._step = jit_step(step, self.state_shardings, self.batch_shardings, mesh, compiler_options)
        graphdef = self.graphdef

        def logprobs(state, tokens):
            return policy_logprobs(nnx.merge(graphdef, state)[0], tokens)[0]

        self._logprobs = jax.jit(logprobs, in_shardings=(self.state_shardings, self.batch_shardings["tokens"]))

    def global_batch(self, batch: Mapping[str, object]) -> dict[str, jax.Array]:
        """The batch (:func:`m1_jax.rl.rollout.to_update_batch`) placed on the mesh, with the step's dtypes."""
        missing = [k for k in self.batch_shardings if k not in batch]
        if missing:
            raise ValueError(f"the update batch has no {', '.join(missing)}")
        sharding.check_batch(int(jnp.shape(batch["tokens"])[0]), self.mesh)
        dtypes = {"tokens": jnp.int32}
        return {k: jax.device_put(jnp.asarray(batch[k], dtypes.get(k, jnp.float32)), s)
                for k, s in self.batch_shardings.items()}

    def update(self, batch: Mapping[str, object]) -> dict[str, jax.Array]:
        """One optimizer step on ``batch``; returns the metrics."""
        return self.update_placed(self.global_batch(batch))

    def update_placed(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """One optimizer step on a batch already placed by :meth:`global_batch` (several update rounds on one
        rollout batch place it once)."""
        self.state, metrics = self._step(self.state, batch)
        return metrics

    def logprobs(self, tokens) -> jax.Array:
        """float32 [B, T - 1]: the log-probs of ``tokens[:, 1:]`` under the current policy, computed as the
        update step computes them (the full-sequence forward)."""
        tokens = jax.device_put(jnp.asarray(tokens, jnp.int32), self.batch_shardings["tokens"])
        return self._logprobs(self.state, tokens)



def build_policy_state(model: M1Model, mesh: Mesh, opts: UpdateOptions, *, optimizer: OptimizerSection | None = None,
                       steps: int = 1, with_ref: bool = False, compiler_options: dict | None = None) -> PolicyState:
    """A :class:`PolicyState` with the train optimizer (:func:`m1_jax.train.make_optimizer`) of ``optimizer``
    (default :func:`rl_optimizer_section`) over ``steps`` updates."""
    optimizer = optimizer or rl_optimizer_section()
    return PolicyState(model, make_optimizer(optimizer, steps), mesh, opts, learning_rate_schedule(optimizer, steps),
                       with_ref=with_ref, compiler_options=compiler_options)
