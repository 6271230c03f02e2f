"""CISPO against DAPO and GRPO on the same task, initial policy, data, seeds and rollout budget (the MiniMax-M1
report's comparison, section 3.1, on a tiny model): held-out pass rate against steps, as a PNG and a table.

Every run starts from one policy: the ``rl-demo`` run config's supervised warm-up (trained once into
``OUT/warmup``), or ``--init-from``. For each seed, every objective sees the same prompt stream (``prompts.seed``)
and the same rollout seeds (``rollout.seed``) -- identical first rollouts, so the first step is the objectives'
only difference -- and the same number of rollouts and update rounds; each objective keeps its own recipe
(DAPO its dynamic sampling, which may spend up to ``rollout.max_rollouts`` rollout batches on a step; GRPO and
CISPO one). The held-out set (greedy, ``prompts.eval_size`` problems) is scored every ``--eval-every`` steps.

    python tools/rl_compare.py --out runs/rl-compare                   # 3 objectives x 3 seeds
    python tools/rl_compare.py --out runs/x --seeds 0 --steps 20 --set rl.update_rounds=8

Writes ``OUT/curves.json`` (every run's pass-rate curve and last metrics), ``OUT/pass_rate.png`` and prints a
markdown table (mean and range over seeds of the pass rate at each scored step, and of the clipped fraction).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from m1_jax.rl.config import load_rl_config
from m1_jax.rl.loop import fit_rl
from m1_jax.rl.warmup import warm_up

OBJECTIVES = ("cispo", "dapo", "grpo")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory (one workdir per run, the PNG, curves.json)")
    ap.add_argument("--config", default=None, help="RL run config (default: rl-demo)")
    ap.add_argument("--init-from", default=None, help="the shared initial policy (default: the config's warm-up)")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="run-config overrides for every run (repeatable)")
    args = ap.parse_args(argv)
    args.objectives = [o for o in args.objectives.split(",") if o]
    unknown = sorted(set(args.objectives) - set(OBJECTIVES))
    if unknown:
        ap.error(f"--objectives: unknown {', '.join(unknown)} (choose from {', '.join(OBJECTIVES)})")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if args.steps < 1 or args.eval_every < 1:
        ap.error("--steps and --eval-every must be >= 1")
    return args


def curve(summary) -> list[tuple[int, float]]:
    points = [(0, summary.eval_before)]
    points += [(r["step"], r["eval_pass_rate"]) for r in summary.records if "eval_pass_rate" in r]
    return points


def table(runs: dict) -> str:
    """Mean [min, max] over seeds of each objective's held-out pass rate at each scored step, and of its mean
    clipped fraction and rollout batches over the steps."""
    steps = [s for s, _ in next(iter(runs.values()))[0]["curve"]]
    head = "| objective | " + " | ".join(f"step {s}" for s in steps) + " | clipped (mean) | rollouts per step |"
    lines = [head, "|" + "---|" * (len(steps) + 3)]
    for obj, seeds in runs.items():
        values = np.array([[p for _, p in r["curve"]] for r in seeds])
        cells = [f"{100 * v.mean():.1f} [{100 * v.min():.1f}, {100 * v.max():.1f}]" for v in values.T]
        clipped = np.mean([r["clip_fraction"] for r in seeds])
        rollouts = np.mean([r["rollouts_per_step"] for r in seeds])
        lines.append(f"| {obj} | " + " | ".join(cells) + f" | {clipped:.3f} | {rollouts:.2f} |")
    return "\n".join(lines)


def plot(runs: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for obj, seeds in runs.items():
        steps = np.array([s for s, _ in seeds[0]["curve"]])
        values = 100 * np.array([[p for _, p in r["curve"]] for r in seeds])
        line, = ax.plot(steps, values.mean(0), marker="o", label=f"{obj.upper()} (mean of {len(seeds)} seeds)")
        ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("RL step (one rollout batch each)")
    ax.set_ylabel("held-out pass rate, greedy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    base = load_rl_config(args.config, [*args.overrides, f"train.steps={args.steps}",
                                        f"train.eval_every={args.eval_every}"])
    init = args.init_from or warm_up(base, args.out, progress=False)
    runs: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for seed in args.seeds:
        for obj in args.objectives:
            run = load_rl_config(args.config, [*args.overrides, f"train.steps={args.steps}",
                                               f"train.eval_every={args.eval_every}", f"rl.objective={obj}",
                                               f"prompts.seed={seed}", f"rollout.seed={seed}"])
            work = os.path.join(args.out, f"{obj}-seed{seed}")
            t = time.perf_counter()
            s = fit_rl(run, work, init_from=init, progress=False)
            recs = s.records
            result = {"seed": seed, "curve": curve(s), "wall_s": time.perf_counter() - t,
                      "clip_fraction": float(np.mean([r["clip_fraction"] for r in recs])),
                      "rollouts_per_step": float(np.mean([r["rollouts"] for r in recs])),
                      "reward_mean_last10": float(np.mean([r["reward_mean"] for r in recs[-10:]]))}
            runs.setdefault(obj, []).append(result)
            print(f"{obj} seed {seed}: pass rate {' '.join(f'{p:.3f}' for _, p in result['curve'])} "
                  f"({result['wall_s']:.0f}s)", flush=True)
    r = base.rl
    title = (f"{base.prompts.source}, {base.prompts.batch_size} prompts x {base.rollout.group_size} samples, "
             f"{r.update_rounds} update rounds per batch, lr {base.optimizer.lr:g}")
    with open(os.path.join(args.out, "curves.json"), "w") as f:
        json.dump({"title": title, "init": init, "runs": runs}, f, indent=1)
    plot(runs, os.path.join(args.out, "pass_rate.png"), title)
    print(f"\n{title}; initial policy {init}; {time.perf_counter() - t0:.0f}s in all\n")
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
