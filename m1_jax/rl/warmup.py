"""The supervised warm-up before RL on a generated task: a short ``m1 train`` run on the task's answer format.

RL needs a policy that already answers in the expected format now and then (a group whose responses all score 0
teaches nothing). When ``m1 rl`` starts from a preset with ``warmup.steps`` > 0, it first trains the model on
``warmup.examples`` solved problems of the task (chat records, loss on the answer only) in ``WORKDIR/warmup`` with
the training loop of ``m1 train``, and starts RL from that checkpoint. The warm-up is cached: a later run in the
same workdir reuses it when its settings (``warmup.*``, ``model.*``, the task and tokenizer) are the same, and
refuses a workdir whose warm-up was made with other settings.
"""

from __future__ import annotations

import json
import os

from m1_jax.rl.config import RLRunConfig
from m1_jax.rl.tasks import get_task
from m1_jax.run_config import RunConfig
from m1_jax.train_loop import fit

SETTINGS_FILE = "warmup.json"


def warmup_run_config(run: RLRunConfig, data_path: str) -> RunConfig:
    """The ``m1 train`` run config of the warm-up: the RL run's model, the warm-up's schedule, the task's data."""
    w = run.warmup
    cfg = RunConfig()
    cfg.update({"model": run.to_dict()["model"],
                "optimizer": {"lr": w.lr, "warmup_steps": min(10, w.steps)},
                "data": {"source": data_path, "format": "jsonl", "tokenizer": run.prompts.tokenizer,
                         "seq_len": w.seq_len, "batch_size": w.batch_size, "seed": run.prompts.seed},
                "train": {"steps": w.steps, "mesh": run.train.mesh, "checkpoint_every": w.steps,
                          "sample_tokens": 0, "async_checkpointing": False}}, source="warmup")
    cfg.validate()
    return cfg


def warm_up(run: RLRunConfig, workdir: str, *, progress: bool = True) -> str:
    """Trains (or reuses) the warm-up model in ``WORKDIR/warmup``; returns that directory (a trained
    checkpoint that :func:`m1_jax.from_pretrained` loads)."""
    task = get_task(run.prompts.source)
    wdir = os.path.join(workdir, "warmup")
    settings = {"warmup": run.to_dict()["warmup"], "model": run.to_dict()["model"], "task": run.prompts.source,
                "tokenizer": run.prompts.tokenizer, "seed": run.prompts.seed}
    settings_path = os.path.join(wdir, SETTINGS_FILE)
    done = os.path.join(wdir, "checkpoints", str(run.warmup.steps))
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            cached = json.load(f)
        if cached != settings:
            raise ValueError(f"{wdir}: a warm-up made with other settings than this run's (warmup.*, model.*, "
                             "prompts.source/tokenizer/seed); remove that directory or choose another --workdir")
        if os.path.isdir(done):
            return wdir
    os.makedirs(wdir, exist_ok=True)
    data_path = os.path.join(wdir, "data.jsonl")
    tmp = data_path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(task.supervised(run.prompts.seed, i)) + "\n" for i in range(run.warmup.examples))
    os.replace(tmp, data_path)
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=1)
    # A warm-up cut short left no checkpoint (it saves once, at the end): it starts over.
    fit(warmup_run_config(run, data_path), wdir, resume=os.path.isdir(os.path.join(wdir, "checkpoints")),
        progress=progress)
    return wdir
