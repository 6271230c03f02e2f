"""Fixtures shared by the model tests: tiny `m1 train` workdirs on one shared corpus, each trained once per test
session."""

import contextlib
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
LONG_STEPS = 6  # a checkpoint every 2 steps, the last two kept: the workdir holds steps 4 and 6


def _shared_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    return root


@contextlib.contextmanager
def _locked(root: Path, name: str):
    """Holds the lock file ``ROOT/NAME.lock`` (shared by the xdist workers) for the block."""
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def trained_corpus(tmp_path_factory) -> Path:
    """``BASE/corpus`` (:func:`text_corpus`, its ``model.json`` beside it): the data source of the shared runs;
    a run that resumes one of them reads it from here."""
    root = _shared_root(tmp_path_factory)
    base = root / "trained-tiny"
    with _locked(root, "trained-tiny"):
        if not (base / "corpus.done").exists():
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir()
            text_corpus(base)
            (base / "corpus.done").touch()
    return base / "corpus"


def _trained_once(trained_corpus: Path, name: str, steps: int, **train) -> Path:
    """``BASE/NAME/run``: the workdir of a ``steps``-step :func:`tiny_run` on :func:`trained_corpus` (``train``:
    fields of its train section), as `m1 train` leaves it, with the final parameters beside it in
    ``BASE/NAME/final_params.npz`` (flat state path joined by ``/`` -> array).

    Trained once per session, also when pytest-xdist runs the tests on several workers: they share one
    directory and wait on a lock for the first."""
    out = trained_corpus.parent / name
    with _locked(trained_corpus.parent, name):
        if not (out / "done").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            run = tiny_run(trained_corpus, steps)
            for field, value in train.items():
                setattr(run.train, field, value)
            summary = fit(run, str(out / "run"), progress=False)
            params = {"/".join(map(str, p)): np.asarray(v.get_value())
                      for p, v in nnx.to_flat_state(summary.final_state.params())}
            np.savez(out / "final_params.npz", **params)
            (out / "done").touch()
    return out / "run"


@pytest.fixture(scope="session")
def trained_workdir(trained_corpus) -> Path:
    """``WORKDIR`` of a 2-step `m1 train` run of the ``tiny`` preset with one layer of each kind on the
    emulated 8-device mesh, as `m1 train` leaves it (``checkpoints/1``, ``checkpoints/2`` written
    synchronously, ``metrics.jsonl``), with the final parameters in ``WORKDIR/../final_params.npz``.
    Read-only for the tests (copy it to damage or resume it)."""
    return _trained_once(trained_corpus, "steps-2", TRAINED_STEPS, checkpoint_every=1, async_checkpointing=False)


@pytest.fixture(scope="session")
def long_trained_workdir(trained_corpus) -> Path:
    """``WORKDIR`` of the same run trained 6 steps straight, saving asynchronously every 2 steps
    (``checkpoints/4``, ``checkpoints/6``), its losses in ``metrics.jsonl`` and its final parameters in
    ``WORKDIR/../final_params.npz``. Read-only for the tests (copy it to damage or resume it)."""
    return _trained_once(trained_corpus, "steps-6", LONG_STEPS)
