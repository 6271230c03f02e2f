"""The training loop of ``m1 train``: data -> sharded steps -> metrics, checkpoints, a sample.

``WORKDIR/metrics.jsonl`` gets one JSON object per step (``step``, ``loss``, ``aux_loss``,
``grad_norm``, ``lr``, ``tokens_per_s``, ``mfu``, ...), written by process 0; TensorBoard event files
go to ``WORKDIR/tensorboard`` when ``tensorboardX`` or ``torch.utils.tensorboard`` is importable.

One run at a time per workdir: process 0 holds an exclusive ``flock`` on ``WORKDIR/train.lock`` for the
whole run (the kernel releases it when the process ends, however it ends), and a second run there
fails with the holder's pid. A resumed run continues from the newest checkpoint that restores, with
the same model config and the same data stream (:data:`m1_jax.run_config.RESUME_FIXED_FIELDS`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field

import jax
import numpy as np
from tqdm.auto import tqdm

from m1_jax import sharding, train
from m1_jax.checkpoint import Checkpointer, CheckpointError
from m1_jax.checkpoint_io.locate import locate
from m1_jax.config import M1Config
from m1_jax.data import get_tokenizer, make_batches
from m1_jax.generation import generate
from m1_jax.loading import from_pretrained
from m1_jax.lora.spec import from_run as lora_from_run
from m1_jax.presets import resolve_config
from m1_jax.run_config import RESUME_FIXED_FIELDS, RunConfig, resume_conflicts

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot continue (a non-finite loss or gradient); the message names the step."""


class WorkdirError(ValueError):
    """A workdir that this run cannot use (in use by another run, or missing for a resume); the message
    names it."""


class WorkdirLock:
    """An exclusive lock on a workdir for one run: ``flock`` on ``WORKDIR/train.lock``, which holds the
    holder's pid and host. The kernel drops the lock when the process ends, even by SIGKILL, so no stale
    lock survives a crash."""

    NAME = "train.lock"

    def __init__(self, workdir: str, command: str = "m1 train"):
        self.workdir, self.command = workdir, command
        self.path = os.path.join(workdir, self.NAME)
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) == 2 else "pid unknown"
            raise WorkdirError(f"{self.workdir}: in use by another `{self.command}` ({who}); wait for it to end or "
                               "choose another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # releases the lock
            self._fd = None


@dataclass
class Summary:
    steps: int = 0
    start_step: int = 0
    losses: list[float] = field(default_factory=list)
    skipped: int = 0
    wall_s: float = 0.0
    checkpoint_step: int | None = None
    final_state: object = None  # the TrainState at the end
    damaged: dict[int, str] = field(default_factory=dict)  # checkpoint steps set aside on resume -> why
    counts: dict = field(default_factory=dict)  # trainable parameters, optimizer bytes (train.parameter_counts)


def tensorboard_writer(directory: str):
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            mod = __import__(module, fromlist=["SummaryWriter"])
            return mod.SummaryWriter(directory)
        except Exception:  # noqa: BLE001 - missing package or missing tensorboard backend
            continue
    return None


def metrics_file(workdir: str, start_step: int):
    """Opens metrics.jsonl for appending after dropping lines past ``start_step`` (a resumed run
    repeats the steps after its checkpoint). The kept lines go to a new file that replaces the old one
    only once it is on disk: a run killed meanwhile leaves the history as it was."""
    path = os.path.join(workdir, "metrics.jsonl")
    kept = []
    if start_step and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(workdir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself is durable
    finally:
        os.close(dir_fd)
    return open(path, "a", buffering=1)


def check_resumable(meta: dict, where: str, config: dict, run: RunConfig, what: str,
                    fixed: tuple[str, ...] = RESUME_FIXED_FIELDS) -> None:
    """Refuses a checkpoint (its ``meta``) saved with another model config or another data stream (the
    run-config fields ``fixed``)."""
    if meta.get("config") != config:
        raise CheckpointError(f"{where}: saved with another model config than {what!r}; resume with the same "
                              "model")
    changed = resume_conflicts(meta["run"], run, fixed) if "run" in meta else []
    saved = lora_from_run(meta.get("run"))
    now = lora_from_run(run.to_dict())
    if saved != now:
        raise CheckpointError(f"{where}: saved with LoRA {_lora_text(saved)}, this run has {_lora_text(now)}; "
                              "resume with the same lora section, or start a new --workdir")
    if changed:
        raise CheckpointError(f"{where}: saved with another data stream ({'; '.join(changed)}); resume with the "
                              "same values, or start a new --workdir")


def _lora_text(lora) -> str:
    cfg, base = lora
    return "none" if cfg is None else f"rank={cfg.rank},alpha={cfg.alpha:g},targets={','.join(cfg.targets)}" + (
        f",base={base}" if base else "")


def load_model_config(run: RunConfig, init_from: str | None) -> M1Config:
    """The config of the checkpoint ``init_from`` (any kind from_pretrained loads), else of the run."""
    return locate(init_from).config() if init_from else resolve_config(run.model.config)


def pretrained_model(path: str, run: RunConfig):
    return from_pretrained(path, **train.model_options(run))


def fit(run: RunConfig, workdir: str, *, resume: bool = False, init_from: str | None = None,
        progress: bool = True, mesh=None) -> Summary:
    """Trains ``run.train.steps`` steps (continuing from the newest checkpoint that restores with
    ``resume``), holding the workdir's lock throughout."""
    with run_workdir(workdir, run.train, resume=resume) as (ckpt, latest):
        return _train(run, workdir, ckpt, latest, init_from=init_from, progress=progress, mesh=mesh)


@contextlib.contextmanager
def run_workdir(workdir: str, t, *, resume: bool, command: str = "m1 train"):
    """The workdir of one run (``t``: the run config's train section), locked for the run (process 0), with its
    :class:`Checkpointer` and newest checkpoint step: ``(ckpt, latest)``. A workdir holding checkpoints needs
    ``resume``; ``resume`` needs the workdir."""
    if resume and not os.path.isdir(workdir):
        raise WorkdirError(f"--resume: {workdir} does not exist, so there is no run to continue; check the path, "
                           "or leave out --resume to start a new run")
    os.makedirs(workdir, exist_ok=True)
    with (WorkdirLock(workdir, command) if jax.process_index() == 0 else contextlib.nullcontext(),
          contextlib.closing(Checkpointer(os.path.join(workdir, "checkpoints"), save_every=t.checkpoint_every,
                                          max_to_keep=t.max_to_keep, async_save=t.async_checkpointing)) as ckpt):
        latest = ckpt.latest_step()
        if latest is not None and not resume:
            raise CheckpointError(f"{ckpt.directory} already holds checkpoints (latest step {latest}); pass "
                                  "--resume to continue that run, or another --workdir")
        if latest is None and resume:
            log.warning("--resume: %s holds no checkpoint; starting from step 0", ckpt.directory)
        yield ckpt, latest


def save_last(ckpt: Checkpointer, step: int, saved: int | None, state, data_state: dict, meta: dict) -> int | None:
    """Saves ``step`` unless it was the last step saved (``saved``) or no step ran, waits for the writes, and
    returns the last step saved."""
    if step and saved != step:
        ckpt.save(step, state, data_state, meta, force=True)
        saved = step
    ckpt.wait()
    return saved


def _train(run: RunConfig, workdir: str, ckpt: Checkpointer, latest: int | None, *, init_from: str | None,
           progress: bool, mesh) -> Summary:
    cfg = load_model_config(run, init_from)
    batches = make_batches(run.data, vocab_size=cfg.vocab_size)  # before the model: data errors come first
    mesh = sharding.as_mesh(mesh or run.train.mesh)
    model = pretrained_model(init_from, run) if init_from else None
    ts = train.build_train_state(cfg, run, mesh, model=model)
    t = run.train
    meta = {"config": cfg.to_dict(), "run": run.to_dict()}
    summary = Summary(counts=train.parameter_counts(ts))
    if latest is not None:
        check = functools.partial(check_resumable, config=meta["config"], run=run,
                                  what=init_from or run.model.config)
        got = ckpt.restore_newest(ts.abstract_state(), check_meta=check)
        ts.state = got.state
        batches.set_state(got.data, where=f"{ckpt.directory}/{got.step}")
        summary.start_step, summary.damaged = got.step, got.damaged
        log.info("resumed from %s/%d", ckpt.directory, got.step)
    primary = jax.process_index() == 0
    metrics_f = metrics_file(workdir, summary.start_step) if primary else None
    tb = tensorboard_writer(os.path.join(workdir, "tensorboard")) if primary else None
    peak = train.peak_flops(mesh.devices.flat[0], t.peak_flops_per_device)
    t_start = time.perf_counter()
    bar = tqdm(total=t.steps, initial=summary.start_step, desc="train", unit="step",
               disable=not (progress and primary))
    try:
        for step in range(summary.start_step, t.steps):
            local = next(batches)
            t0 = time.perf_counter()
            metrics = jax.device_get(ts.train_step(ts.global_batch(local)))
            dt = time.perf_counter() - t0
            if not metrics["ok"]:
                if t.on_nan == "stop":
                    raise TrainingError(f"step {step + 1}: non-finite loss ({float(metrics['loss'])}) or gradient "
                                        f"norm ({float(metrics['grad_norm'])}); the update was not applied. "
                                        "Resume from the last checkpoint with a lower optimizer.lr, or set "
                                        "train.on_nan=skip")
                summary.skipped += 1
            record = {"step": step + 1, **{k: float(v) for k, v in metrics.items() if k != "ok"},
                      "skipped": int(not metrics["ok"]), "step_time_s": dt,
                      "tokens_per_s": local["inputs"].size * jax.process_count() / dt}
            record["mfu"] = train.mfu(record["tokens_per_s"], cfg, run.data.seq_len, mesh.size, peak)
            summary.losses.append(record["loss"])
            if primary:
                metrics_f.write(json.dumps(record) + "\n")
                if tb is not None:
                    for k in ("loss", "aux_loss", "grad_norm", "lr", "tokens_per_s"):
                        tb.add_scalar(k, record[k], step + 1)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            if ckpt.save(step + 1, ts.state, batches.get_state(), meta):
                summary.checkpoint_step = step + 1
            summary.steps = step + 1
        summary.checkpoint_step = save_last(ckpt, summary.steps, summary.checkpoint_step, ts.state,
                                            batches.get_state(), meta)
    finally:
        bar.close()
        if metrics_f is not None:
            metrics_f.close()
        if tb is not None:
            tb.close()
    summary.wall_s = time.perf_counter() - t_start
    summary.final_state = ts
    return summary


def sample_from_checkpoint(workdir: str, run: RunConfig, *, prompt: str, max_new_tokens: int,
                           temperature: float = 0.7, top_k: int = 40, seed: int = 0, init_from=None) -> str:
    """Loads the parameters of the latest checkpoint of ``workdir`` on one device (not the optimizer state)
    and continues ``prompt``."""
    model = from_pretrained(workdir, **train.model_options(run))
    cfg = model.cfg
    tokenizer = get_tokenizer(run.data.tokenizer if not init_from else init_from, cfg.vocab_size)
    ids = tokenizer.encode(prompt)
    out = generate(model, [ids], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    return prompt + tokenizer.decode(np.asarray(out)[0].tolist(), skip_special_tokens=True)
