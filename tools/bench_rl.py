"""RL step throughput on this machine: one CISPO step of the tiny preset and a ~100M-parameter config, split
into rollout, reward + advantage and update.

One step, as an RL loop runs it on one device (mesh ``data=1``):

1. rollout: ``--group-size`` responses of ``--max-new-tokens`` to each of ``--prompts`` prompts of
   ``--prompt-len`` random tokens, sampled at temperature 1 from the current policy
   (:func:`m1_jax.rl.rollout.rollout`: the compiled ``generate``, with the behaviour log-probs). No
   end-of-sequence token is set, so every row generates exactly ``--max-new-tokens`` tokens;
2. reward + advantage, on the host: random 0/1 rewards from a seeded NumPy generator (no verifier runs: its
   cost depends on the task), group advantages (:func:`m1_jax.rl.objectives.flat_group_advantages`) and the
   update batch (:func:`m1_jax.rl.rollout.to_update_batch`);
3. update: ``--rounds`` CISPO optimizer steps on that batch (:func:`m1_jax.rl.update.build_policy_state`,
   the report's AdamW settings), each over the whole rows x length batch.

Rollout tokens/s = generated tokens / rollout seconds; update tokens/s = rows x length x rounds / update
seconds (the update's forward and backward run over the prompt tokens too). A warm-up step (one update
round) compiles the rollout and the update first; its rollout and update times are reported apart, as
"with compile" (they include one run). The timed figures are those of the fastest of ``--repeats`` steps
(the minimum of the step time; all phases of that step).

    JAX_PLATFORMS=cpu python tools/bench_rl.py                          # tiny and ~100M, float32
    JAX_PLATFORMS=cpu python tools/bench_rl.py --configs tiny --rounds 16 --out bench_rl.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# bench_train (the ~100M config) and bench_convert (the machine line) sit beside this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from bench_convert import machine
from bench_train import config_100m

from m1_jax import sharding
from m1_jax.config import human, param_counts
from m1_jax.model import REMAT_POLICIES, init_model
from m1_jax.presets import resolve_config
from m1_jax.rl.objectives import flat_group_advantages
from m1_jax.rl.rollout import rollout, to_update_batch
from m1_jax.rl.update import UpdateOptions, build_policy_state, rl_optimizer_section

CONFIGS = {"tiny": lambda: resolve_config("tiny"), "100m": config_100m}
HEADER = ("| config | params | rows x length | rollout s | rollout tokens/s | reward + adv. s | update s (rounds) | "
          "update tokens/s | split rollout / reward / update | step s | steps/s | first rollout s (with compile) | "
          "first update round s (with compile) |")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,100m",
                    help=f"comma-separated, of {', '.join(CONFIGS)} (default %(default)s)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (default %(default)s)")
    ap.add_argument("--group-size", type=int, default=8, help="responses per prompt (default %(default)s)")
    ap.add_argument("--prompt-len", type=int, default=64, help="random tokens per prompt (default %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens per response (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=4, help="update rounds per rollout batch (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="timed steps; the fastest is reported (default %(default)s)")
    ap.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation slices (default %(default)s)")
    ap.add_argument("--remat", choices=tuple(REMAT_POLICIES), default="none", help="default %(default)s")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the model's compute dtype (default %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-6, help="learning rate (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="prompts, init, sampling and rewards (default %(default)s)")
    ap.add_argument("--out", help="also write the rows and the setup as JSON here")
    args = ap.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    for flag in ("prompts", "group_size", "prompt_len", "max_new_tokens", "rounds", "repeats", "micro_batches"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if (args.prompts * args.group_size) % args.micro_batches:
        ap.error(f"--micro-batches {args.micro_batches} does not divide the {args.prompts * args.group_size} rows "
                 f"(--prompts x --group-size)")
    return args


def rl_step(policy, prompts, rng: np.random.Generator, args, seed: int, rounds: int) -> dict:
    """One RL step (the module docstring's three phases), each timed to its end."""
    t0 = time.perf_counter()
    r = rollout(policy.model(), prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                temperature=1.0, seed=seed)
    t1 = time.perf_counter()
    rewards = rng.integers(0, 2, r.tokens.shape[0]).astype(np.float32)
    batch = to_update_batch(r, np.asarray(flat_group_advantages(rewards, args.group_size)))
    t2 = time.perf_counter()
    for _ in range(rounds):
        metrics = policy.update(batch)
    metrics = jax.device_get(metrics)
    t3 = time.perf_counter()
    if not metrics["ok"]:
        raise RuntimeError(f"the update's loss or gradient was not finite: {metrics}")
    return {"rollout_s": t1 - t0, "reward_s": t2 - t1, "update_s": t3 - t2, "step_s": t3 - t0,
            "generated": int(r.response_lengths.sum()), "rows": r.tokens.shape[0], "length": r.tokens.shape[1]}


def bench(name: str, args) -> dict:
    cfg = CONFIGS[name]()
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(1, cfg.vocab_size, (args.prompts, args.prompt_len)).tolist()
    model = init_model(cfg, seed=args.seed, dtype=jnp.dtype(args.dtype))
    mesh = sharding.make_mesh("data=1", jax.devices()[:1])
    policy = build_policy_state(model, mesh, UpdateOptions(objective="cispo", micro_batches=args.micro_batches,
                                                           remat=args.remat),
                                optimizer=rl_optimizer_section(lr=args.lr, warmup_steps=0),
                                steps=args.rounds * (args.repeats + 1))
    warm = rl_step(policy, prompts, rng, args, args.seed, rounds=1)
    steps = [rl_step(policy, prompts, rng, args, args.seed + 1 + i, args.rounds) for i in range(args.repeats)]
    best = min(steps, key=lambda s: s["step_s"])
    tokens = best["rows"] * best["length"] * args.rounds
    return {"config": name, "params": param_counts(cfg)["total"], **best,
            "rollout_tokens_per_s": best["generated"] / best["rollout_s"],
            "update_tokens_per_s": tokens / best["update_s"], "steps_per_s": 1 / best["step_s"],
            "first_rollout_s": warm["rollout_s"], "first_update_s": warm["update_s"],
            "step_s_all": [s["step_s"] for s in steps]}


def table(rows: list[dict], rounds: int) -> str:
    lines = [HEADER, "|---" * (HEADER.count("|") - 1) + "|"]
    for r in rows:
        split = " / ".join(f"{r[k] / r['step_s']:.1%}" for k in ("rollout_s", "reward_s", "update_s"))
        lines.append(f"| {r['config']} | {human(r['params'])} | {r['rows']} x {r['length']} | {r['rollout_s']:.3f} | "
                     f"{r['rollout_tokens_per_s']:.0f} | {r['reward_s']:.4f} | {r['update_s']:.3f} ({rounds}) | "
                     f"{r['update_tokens_per_s']:.0f} | {split} | {r['step_s']:.3f} | {r['steps_per_s']:.3g} | "
                     f"{r['first_rollout_s']:.1f} | {r['first_update_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup = {"machine": machine(), "jax": jax.__version__, "backend": jax.default_backend(), "dtype": args.dtype,
             **{k: getattr(args, k) for k in ("prompts", "group_size", "prompt_len", "max_new_tokens", "rounds",
                                              "repeats", "micro_batches", "remat", "lr", "seed")}}
    print(", ".join(f"{k}={v}" for k, v in setup.items()), flush=True)
    rows = []
    for name in args.configs:
        rows.append(bench(name, args))
        print(f"{name}: steps {', '.join(f'{s:.3f}' for s in rows[-1]['step_s_all'])} s", flush=True)
    print(f"\nfastest of {args.repeats} timed steps after a warm-up step; temperature 1, no eos (every response "
          f"{args.max_new_tokens} tokens), random 0/1 rewards\n")
    print(table(rows, args.rounds))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"setup": setup, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
