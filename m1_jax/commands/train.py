"""``m1 train``: train or fine-tune from a run config (default: the ``train-demo`` preset, a tiny
hybrid M1 on the Python standard library's source, byte-level tokens, on an 8-device mesh), then
print a sample from the final checkpoint."""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


def add_arguments(p):
    p.add_argument("--config", default=None, help="run config: a JSON file or a preset name "
                                                  "(default: train-demo)")
    p.add_argument("--steps", type=int, default=None, help="train until this step (overrides train.steps)")
    p.add_argument("--workdir", default="runs/demo", help="checkpoints and metrics.jsonl go here (default: runs/demo)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from pretrained weights: an HF checkpoint directory or an `m1 convert` output")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,fsdp=2,expert=2,tensor=1 "
                                                "(overrides train.mesh)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any run-config field, e.g. --set optimizer.lr=1e-3 (repeatable)")
    p.add_argument("--no-sample", action="store_true", help="do not print a sample at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-process runs)")
    p.add_argument("--num-processes", type=int, default=None,
                   help="processes in a multi-process run, one per host (default: JAX_NUM_PROCESSES, else 1)")
    p.add_argument("--process-id", type=int, default=None,
                   help="this process's index, 0 .. --num-processes - 1 (default: JAX_PROCESS_ID)")


def run(args) -> int:
    # XLA's C++ warnings (e.g. SPMD resharding notes) would bury the progress bar; errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from m1_jax import distributed
    from m1_jax.run_config import load_run_config

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.mesh is not None:
        overrides.append(f"train.mesh={args.mesh}")
    run_cfg = load_run_config(args.config, overrides)
    distributed.setup(mesh=run_cfg.train.mesh, coordinator=args.coordinator, num_processes=args.num_processes,
                      process_id=args.process_id)

    import jax

    from m1_jax.train_loop import fit, sample_from_checkpoint

    t0 = time.perf_counter()
    summary = fit(run_cfg, args.workdir, resume=args.resume, init_from=args.init_from,
                  progress=not args.no_progress)
    if jax.process_index() != 0:
        return 0
    if summary.losses:
        print(f"trained steps {summary.start_step + 1}..{summary.steps} on mesh {run_cfg.train.mesh}: loss "
              f"{summary.losses[0]:.4f} -> {summary.losses[-1]:.4f} in {summary.wall_s:.1f}s "
              f"({summary.skipped} skipped); metrics in {os.path.join(args.workdir, 'metrics.jsonl')}")
    else:
        print(f"nothing to train: the checkpoint is already at step {summary.start_step} of {run_cfg.train.steps}")
    print(f"checkpoint: {os.path.join(os.path.abspath(args.workdir), 'checkpoints', str(summary.checkpoint_step or summary.start_step))}")
    n = run_cfg.train.sample_tokens
    if n and not args.no_sample:
        text = sample_from_checkpoint(args.workdir, run_cfg, prompt=run_cfg.train.sample_prompt, max_new_tokens=n,
                                      init_from=args.init_from)
        print(f"\nsample from the checkpoint (temperature 0.7, top-k 40):\n{'-' * 60}\n{text}\n{'-' * 60}")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0
