"""``m1 rl``: reinforcement learning with verifiable rewards (CISPO by default) from a run config (default: the
``rl-demo`` preset: a tiny hybrid M1, briefly supervised on a generated task's answer format, then CISPO), then
the held-out pass rate before and after."""

from __future__ import annotations

import glob
import os
import time

from m1_jax.commands.train import new_workdir


def add_arguments(p):
    p.add_argument("--config", default=None, help="RL run config: a JSON file or a preset name (default: rl-demo)")
    p.add_argument("--steps", type=int, default=None, help="run until this step (overrides train.steps)")
    p.add_argument("--workdir", default=None,
                   help="checkpoints, the warm-up and metrics.jsonl go here (default: a new runs/rl-NAME-YYYYmmdd-"
                        "HHMMSS); a workdir holding checkpoints needs --resume")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from this policy: an HF checkpoint directory, an `m1 convert` output or an `m1 train` "
                        "workdir (no warm-up then)")
    p.add_argument("--objective", default=None, help="cispo, grpo or dapo (overrides rl.objective)")
    p.add_argument("--reward", default=None,
                   help="a built-in reward or your own as module:function / path/file.py:function, called as "
                        "fn(response_text, record) -> float (overrides rollout.reward)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,fsdp=2,expert=2 (overrides train.mesh)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any run-config field, e.g. --set rollout.group_size=16 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_name(config: str | None) -> str:
    return "rl-" + os.path.splitext(os.path.basename(config or "rl-demo"))[0].removeprefix("rl-")


def run(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from m1_jax import distributed
    from m1_jax.rl.config import load_rl_config

    overrides = list(args.overrides)
    for flag, key in ((args.steps, "train.steps"), (args.mesh, "train.mesh"), (args.objective, "rl.objective"),
                      (args.reward, "rollout.reward")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    run_cfg = load_rl_config(args.config, overrides)
    distributed.setup(mesh=run_cfg.train.mesh)

    from m1_jax.rl.loop import fit_rl

    workdir = args.workdir
    if workdir is None:
        if args.resume:
            runs = sorted(glob.glob(os.path.join("runs", f"{run_name(args.config)}-*")))
            newest = f" (the newest here: --workdir {runs[-1]})" if runs else ""
            raise ValueError(f"--resume: name the run to continue with --workdir{newest}")
        workdir = new_workdir(run_name(args.config))
    print(f"workdir: {workdir}", flush=True)
    t0 = time.perf_counter()
    s = fit_rl(run_cfg, workdir, resume=args.resume, init_from=args.init_from, progress=not args.no_progress)
    print(f"policy: {s.init}")
    if s.records:
        first, last = s.records[0], s.records[-1]
        line = (f"{run_cfg.rl.objective} steps {s.start_step + 1}..{s.steps}: rollout reward "
                f"{first['reward_mean']:.3f} -> {last['reward_mean']:.3f} in {s.wall_s:.1f}s")
        if first.get("consistency") is not None:
            c = first["consistency"]
            line += f"; behaviour vs update log-prob correlation {c:.6f} (1 - {1 - c:.1e})"
        print(line)
    else:
        print(f"nothing to run: the checkpoint is already at step {s.start_step} of {run_cfg.train.steps}")
    if s.eval_before is not None or s.eval_after is not None:
        n = run_cfg.prompts.eval_size
        before = "-" if s.eval_before is None else f"{s.eval_before:.1%}"
        after = "-" if s.eval_after is None else f"{s.eval_after:.1%}"
        print(f"held-out pass rate ({n} problems, greedy): {before} before, {after} after")
    print(f"metrics: {os.path.join(workdir, 'metrics.jsonl')}")
    print(f"checkpoint: {os.path.join(os.path.abspath(workdir), 'checkpoints', str(s.checkpoint_step or s.start_step))}")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0
