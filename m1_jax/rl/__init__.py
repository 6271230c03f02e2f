"""Reinforcement learning on sampled responses with verifiable rewards.

* :mod:`m1_jax.rl.objectives` (JAX): group advantages and the policy-gradient objectives CISPO (MiniMax-M1),
  GRPO and DAPO over per-token arrays, with their metrics, and the table that picks one by name.
* :mod:`m1_jax.rl.logprobs` (JAX): log-probabilities of chosen tokens and the entropy of each position, from logits.
* :mod:`m1_jax.rl.rollout` (JAX): ``group_size`` sampled responses per prompt with their behaviour log-probs,
  laid out as the update's batch.
* :mod:`m1_jax.rl.update` (JAX): the policy update, one jit-compiled sharded step applying an objective.
* :mod:`m1_jax.rl.consistency` (NumPy): train/inference consistency, the correlation of the behaviour log-probs
  with the update step's for the same tokens (the MiniMax-M1 report's figure 3).
* :mod:`m1_jax.rl.rollout_filters` (NumPy): dynamic sampling (which groups to keep) and M1's repetition stop.
* :mod:`m1_jax.rl.rewards` (no JAX): the registry of verifiable rewards and the loader of a user's
  ``module:function``; :mod:`m1_jax.rl.code_runner` runs Python code under time and memory limits.

Nothing is imported here, so the reward, filter and consistency modules load without JAX.
"""
