"""``m1 train``: train or fine-tune from a run config (default: the ``train-demo`` preset, a tiny
hybrid M1 on the Python standard library's source, byte-level tokens, on an 8-device mesh), then
print a sample from the final checkpoint."""

from __future__ import annotations

import glob
import logging
import os
import time

from m1_jax.lora.options import add_lora_argument, lora_overrides

log = logging.getLogger(__name__)


def add_arguments(p):
    p.add_argument("--config", default=None, help="run config: a JSON file or a preset name "
                                                  "(default: train-demo)")
    p.add_argument("--steps", type=int, default=None, help="train until this step (overrides train.steps)")
    p.add_argument("--workdir", default=None,
                   help="checkpoints and metrics.jsonl go here (default: a new runs/NAME-YYYYmmdd-HHMMSS, NAME "
                        "from --config); a workdir holding checkpoints needs --resume")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from pretrained weights: an HF checkpoint directory or an `m1 convert` output")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,fsdp=2,expert=2,tensor=1 "
                                                "(overrides train.mesh)")
    add_lora_argument(p, "LoRA fine-tuning (sets the run config's lora section)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any run-config field, e.g. --set optimizer.lr=1e-3 (repeatable)")
    p.add_argument("--no-sample", action="store_true", help="do not print a sample at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-process runs)")
    p.add_argument("--num-processes", type=int, default=None,
                   help="processes in a multi-process run, one per host (default: JAX_NUM_PROCESSES, else 1)")
    p.add_argument("--process-id", type=int, default=None,
                   help="this process's index, 0 .. --num-processes - 1 (default: JAX_PROCESS_ID)")


def run_name(config: str | None) -> str:
    """The run config's name without its ``train-`` prefix (``demo`` by default)."""
    return os.path.splitext(os.path.basename(config or "train-demo"))[0].removeprefix("train-") or "run"


def new_workdir(config: str | None, root: str = "runs") -> str:
    """Creates and returns a fresh ``ROOT/NAME-YYYYmmdd-HHMMSS`` (``-2``, ``-3``, ... when taken)."""
    base = os.path.join(root, f"{run_name(config)}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = base, 1
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            n += 1
            path = f"{base}-{n}"


def run(args) -> int:
    # XLA's C++ warnings (e.g. SPMD resharding notes) would bury the progress bar; errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from m1_jax import distributed
    from m1_jax.run_config import load_run_config

    overrides = lora_overrides(args) + list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.mesh is not None:
        overrides.append(f"train.mesh={args.mesh}")
    run_cfg = load_run_config(args.config, overrides)
    distributed.setup(mesh=run_cfg.train.mesh, coordinator=args.coordinator, num_processes=args.num_processes,
                      process_id=args.process_id)

    import jax

    from m1_jax.train_loop import fit, sample_from_checkpoint

    workdir = args.workdir
    if workdir is None:
        if args.resume:
            runs = sorted(glob.glob(os.path.join("runs", f"{run_name(args.config)}-*")))
            newest = f" (the newest here: --workdir {runs[-1]})" if runs else ""
            raise ValueError(f"--resume: name the run to continue with --workdir{newest}")
        if jax.process_count() > 1:
            raise ValueError("--workdir: required when several processes train together (all name the same "
                             "directory)")
        workdir = new_workdir(args.config)
    if jax.process_index() == 0:
        print(f"workdir: {workdir}", flush=True)
    t0 = time.perf_counter()
    summary = fit(run_cfg, workdir, resume=args.resume, init_from=args.init_from, progress=not args.no_progress)
    if jax.process_index() != 0:
        return 0
    c = summary.counts
    if c:
        print(f"trainable parameters: {c['trainable']:,} of {c['base_params']:,} "
              f"({100 * c['trainable'] / max(c['base_params'], 1):.3g}%); optimizer state "
              f"{c['optimizer_bytes']:,} bytes (full fine-tuning: {c['full_trainable']:,} parameters, "
              f"{c['full_optimizer_bytes']:,} bytes)")
    if summary.losses:
        print(f"trained steps {summary.start_step + 1}..{summary.steps} on mesh {run_cfg.train.mesh}: loss "
              f"{summary.losses[0]:.4f} -> {summary.losses[-1]:.4f} in {summary.wall_s:.1f}s "
              f"({summary.skipped} skipped); metrics in {os.path.join(workdir, 'metrics.jsonl')}")
    else:
        print(f"nothing to train: the checkpoint is already at step {summary.start_step} of {run_cfg.train.steps}")
    step = summary.checkpoint_step or summary.start_step
    print(f"checkpoint: {os.path.join(os.path.abspath(workdir), 'checkpoints', str(step))}")
    n = run_cfg.train.sample_tokens
    if n and not args.no_sample:
        text = sample_from_checkpoint(workdir, run_cfg, prompt=run_cfg.train.sample_prompt, max_new_tokens=n,
                                      init_from=args.init_from)
        print(f"\nsample from the checkpoint (temperature 0.7, top-k 40):\n{'-' * 60}\n{text}\n{'-' * 60}")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0
