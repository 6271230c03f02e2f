"""Fixtures shared by the model tests: a tiny `m1 train` workdir, trained once per test session."""

import fcntl
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from test_checkpoint import text_corpus, tiny_run

from m1_jax.train_loop import fit

TRAINED_STEPS = 2  # a checkpoint after each step: the workdir holds steps 1 and 2


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory) -> Path:
    """``WORKDIR`` of a 2-step `m1 train` run of the ``tiny`` preset on the emulated 8-device mesh, as
    `m1 train` leaves it (``checkpoints/1``, ``checkpoints/2``, ``metrics.jsonl``), with the final
    parameters beside it in ``WORKDIR/../final_params.npz`` (flat state path joined by ``/`` -> array).

    Read-only for the tests (copy it to damage it). Trained once per session, also when pytest-xdist
    runs the tests on several workers: they share one directory and wait on a lock for the first."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    base = root / "trained-tiny"
    with open(root / "trained-tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "done").exists():
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir()
            run = tiny_run(text_corpus(base), TRAINED_STEPS)
            run.train.checkpoint_every = 1
            run.train.async_checkpointing = False
            summary = fit(run, str(base / "run"), progress=False)
            params = {"/".join(map(str, p)): np.asarray(v.get_value())
                      for p, v in nnx.to_flat_state(summary.final_state.params())}
            np.savez(base / "final_params.npz", **params)
            (base / "done").touch()
    return base / "run"
