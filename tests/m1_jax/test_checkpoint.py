"""Training checkpoints: exact resume (N steps + resume == the same steps straight, bit for bit), restore onto
another mesh, a run killed with SIGKILL during an async save resumes from the last complete checkpoint, a resume
steps past damaged checkpoints and refuses another model or data stream."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from m1_jax.checkpoint import CheckpointError
from m1_jax.config import FULL, LINEAR
from m1_jax.presets import resolve_config
from m1_jax.run_config import RunConfig
from m1_jax.train_loop import fit

REPO = Path(__file__).resolve().parents[2]


def text_corpus(root: Path) -> Path:
    """A few small text documents of different lengths."""
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "None", "x", "y", "(", ")"]
    d = root / "corpus"
    d.mkdir()
    for i in range(12):
        n = int(rng.integers(5, 60))
        (d / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, n)) + "\n")
    # beside the corpus: tiny_run's model (subprocesses import this module without the tests' helpers)
    resolve_config("tiny").replace(layer_types=[LINEAR, FULL], num_hidden_layers=2).to_json(root / "model.json")
    return d


def tiny_run(corpus: Path, steps: int, mesh: str = "data=2,fsdp=2,expert=2,tensor=1") -> RunConfig:
    run = RunConfig()
    run.model.config = str(corpus.parent / "model.json")  # the tiny preset with one layer of each kind
    run.data.source, run.data.seq_len, run.data.batch_size = str(corpus), 32, 8
    run.data.shards = 2  # the stream two processes read (test_multihost), the same in one
    run.train.steps, run.train.mesh, run.train.checkpoint_every = steps, mesh, 2
    run.train.fast_compile, run.train.sample_tokens = True, 0
    run.optimizer.warmup_steps, run.optimizer.decay_steps = 1, 8  # one schedule: runs share the compiled step
    return run


def params_of(summary) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(summary.final_state.params())}


def final_params_of(workdir: Path) -> dict[str, np.ndarray]:
    """The final parameters a shared run (tests/m1_jax/conftest.py) left beside its workdir."""
    return dict(np.load(workdir.parent / "final_params.npz"))


def assert_params_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def losses_of(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def test_exact_resume(trained_workdir, long_trained_workdir, trained_corpus, tmp_path):
    """2 steps (the shared 2-step run), then 4 more in a fresh run config and train state (train.steps raised to
    6: only the total changes) == 6 steps straight (the shared 6-step run), bit for bit."""
    b = tmp_path / "b"
    shutil.copytree(trained_workdir, b)
    second = fit(tiny_run(trained_corpus, 6), str(b), resume=True, progress=False)
    assert second.start_step == 2
    first, straight = losses_of(trained_workdir), losses_of(long_trained_workdir)
    assert list(first) == [1, 2] and list(straight) == [1, 2, 3, 4, 5, 6]
    assert list(first.values()) + second.losses == list(straight.values())  # exactly equal floats
    assert_params_equal(params_of(second), final_params_of(long_trained_workdir))
    assert list(losses_of(b)) == [1, 2, 3, 4, 5, 6]


def test_restore_onto_another_mesh(trained_workdir, long_trained_workdir, trained_corpus, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(trained_workdir, b)  # saved on data=2,fsdp=2,expert=2 at step 2
    other = fit(tiny_run(trained_corpus, 3, mesh="data=1,fsdp=2,expert=2,tensor=2"), str(b),
                resume=True, progress=False)
    np.testing.assert_allclose(other.losses, list(losses_of(long_trained_workdir).values())[2:3], rtol=1e-5)
    leaf = jax.tree.leaves(other.final_state.state)[0]
    assert leaf.sharding.mesh.shape["tensor"] == 2


def damage(step_dir: Path, item: str = "state") -> None:
    """Truncates the data files of one item of a saved step to half their size, as a failing disk would."""
    files = list((step_dir / item).glob("ocdbt.process_*/d/*")) if item == "state" else [step_dir / item / "metadata"]
    assert files and all(f.is_file() for f in files), step_dir
    for f in files:
        os.truncate(f, f.stat().st_size // 2)


def test_resume_refuses_changes_and_steps_past_damage(long_trained_workdir, trained_corpus, tmp_path, caplog):
    corpus = trained_corpus
    w = tmp_path / "w"
    shutil.copytree(long_trained_workdir, w)  # checkpoints at steps 4 and 6
    straight = list(losses_of(long_trained_workdir).values())
    with pytest.raises(CheckpointError, match="already holds checkpoints.*--resume"):
        fit(tiny_run(corpus, 6), str(w), progress=False)
    (tmp_path / "o").mkdir()
    other = text_corpus(tmp_path / "o")
    for field, value, change in [("data.seq_len", 64, "data.seq_len: 32 when the checkpoint was written, 64 now"),
                                 ("data.source", str(other),
                                  f"data.source: '{corpus}' when the checkpoint was written, '{other}' now")]:
        run = tiny_run(corpus, 8)
        run.set(field, value)
        with pytest.raises(CheckpointError, match=rf"{w}/checkpoints/6: saved with another data stream \({change}\)"):
            fit(run, str(w), resume=True, progress=False)

    damage(w / "checkpoints" / "6")
    with caplog.at_level(logging.WARNING):
        resumed = fit(tiny_run(corpus, 8), str(w), resume=True, progress=False)
    assert resumed.start_step == 4 and list(resumed.damaged) == [6]
    assert re.search(r"checkpoint step 6 is damaged, set aside as .*/6\.damaged: .*/6/state: cannot be restored",
                     caplog.text)
    assert resumed.losses[:2] == straight[4:]  # the same steps 5, 6 again, from step 4
    assert sorted(p.name for p in (w / "checkpoints").iterdir()) == ["6", "6.damaged", "8"]
    assert list(losses_of(w)) == [1, 2, 3, 4, 5, 6, 7, 8]

    damage(w / "checkpoints" / "8", "meta")
    damage(w / "checkpoints" / "6")
    with pytest.raises(CheckpointError, match=r"checkpoints: no checkpoint restores: step 8: .*/8/meta: unreadable "
                                              r"\(.*\); step 6: .*/6/state: cannot be restored"):
        fit(tiny_run(corpus, 10), str(w), resume=True, progress=False)


KILLER = textwrap.dedent("""
    import os, signal, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    sys.path.insert(0, {tests!r})
    from test_checkpoint import tiny_run
    from pathlib import Path
    from m1_jax import checkpoint, train_loop

    save = checkpoint.Checkpointer.save
    def save_then_die(self, step, *a, **k):
        started = save(self, step, *a, **k)
        if started and step == 4:  # the async write of step 4 is in flight: die now
            os.kill(os.getpid(), signal.SIGKILL)
        return started
    checkpoint.Checkpointer.save = save_then_die
    train_loop.fit(tiny_run(Path({corpus!r}), 6), {workdir!r}, progress=False)
""")


def test_sigkill_during_async_save_resumes_from_last_complete(long_trained_workdir, trained_corpus, tmp_path):
    workdir = tmp_path / "killed"
    script = KILLER.format(tests=str(Path(__file__).parent), corpus=str(trained_corpus), workdir=str(workdir))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = workdir / "checkpoints"
    complete = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert 2 in complete and max(complete) <= 4, sorted(os.listdir(ckpts))
    resumed = fit(tiny_run(trained_corpus, 6), str(workdir), resume=True, progress=False)
    assert resumed.start_step == max(complete)
    # the same run trained 6 steps straight (the shared 6-step run)
    assert resumed.losses == list(losses_of(long_trained_workdir).values())[resumed.start_step:]
    assert_params_equal(params_of(resumed), final_params_of(long_trained_workdir))


def test_init_from_a_converted_checkpoint(tmp_path, golden_dir):
    """``m1 train --init-from DST``: training starts from the weights ``m1 convert`` wrote, on a mesh."""
    import m1_jax
    from m1_jax.convert.convert import convert

    dst = tmp_path / "converted"
    convert(golden_dir / "sharded", dst, progress=False)
    run = tiny_run(text_corpus(tmp_path), 1)
    run.optimizer.lr = 0.0  # the one step leaves the weights where they started
    summary = fit(run, str(tmp_path / "w"), init_from=str(dst), progress=False)
    assert np.isfinite(summary.losses[0])
    want = {"/".join(map(str, k)): np.asarray(v)
            for k, v in nnx.to_flat_state(nnx.state(m1_jax.from_pretrained(dst), nnx.Param))}
    got = params_of(summary)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k].astype(got[k].dtype), err_msg=k)
