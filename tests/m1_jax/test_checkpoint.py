"""Training checkpoints: exact resume (2N straight == N + resume N, bit for bit), restore onto another
mesh, a run killed with SIGKILL during an async save resumes from the last complete checkpoint, a resume
steps past damaged checkpoints and refuses another model or data stream."""

import json
import logging
import os
import re
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
    run.train.steps, run.train.mesh, run.train.checkpoint_every = steps, mesh, 2
    run.train.fast_compile, run.train.sample_tokens = True, 0
    run.optimizer.warmup_steps, run.optimizer.decay_steps = 1, 8  # one schedule: runs share the compiled step
    return run


def params_of(summary):
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(summary.final_state.params())}


def losses_of(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def test_exact_resume(tmp_path):
    corpus = text_corpus(tmp_path)
    straight = fit(tiny_run(corpus, 4), str(tmp_path / "a"), progress=False)
    first = fit(tiny_run(corpus, 2), str(tmp_path / "b"), progress=False)
    # a fresh run config and train state (train.steps raised to 4: only the total changes)
    second = fit(tiny_run(corpus, 4), str(tmp_path / "b"), resume=True, progress=False)
    assert second.start_step == 2
    assert first.losses + second.losses == straight.losses  # exactly equal floats
    a, b = params_of(straight), params_of(second)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=str(k))
    assert list(losses_of(tmp_path / "b")) == [1, 2, 3, 4]


def test_restore_onto_another_mesh(tmp_path):
    corpus = text_corpus(tmp_path)
    straight = fit(tiny_run(corpus, 3), str(tmp_path / "a"), progress=False)
    fit(tiny_run(corpus, 2), str(tmp_path / "b"), progress=False)
    other = fit(tiny_run(corpus, 3, mesh="data=1,fsdp=2,expert=2,tensor=2"), str(tmp_path / "b"),
                resume=True, progress=False)
    np.testing.assert_allclose(other.losses, straight.losses[2:], rtol=1e-5)
    leaf = jax.tree.leaves(other.final_state.state)[0]
    assert leaf.sharding.mesh.shape["tensor"] == 2


def damage(step_dir: Path, item: str = "state") -> None:
    """Truncates the data files of one item of a saved step to half their size, as a failing disk would."""
    files = list((step_dir / item).glob("ocdbt.process_*/d/*")) if item == "state" else [step_dir / item / "metadata"]
    assert files and all(f.is_file() for f in files), step_dir
    for f in files:
        os.truncate(f, f.stat().st_size // 2)


def test_resume_refuses_changes_and_steps_past_damage(tmp_path, caplog):
    corpus = text_corpus(tmp_path)
    w = tmp_path / "w"
    first = fit(tiny_run(corpus, 4), str(w), progress=False)  # checkpoints at steps 2 and 4
    with pytest.raises(CheckpointError, match="already holds checkpoints.*--resume"):
        fit(tiny_run(corpus, 4), str(w), progress=False)
    (tmp_path / "o").mkdir()
    other = text_corpus(tmp_path / "o")
    for field, value, change in [("data.seq_len", 64, "data.seq_len: 32 when the checkpoint was written, 64 now"),
                                 ("data.source", str(other),
                                  f"data.source: '{corpus}' when the checkpoint was written, '{other}' now")]:
        run = tiny_run(corpus, 6)
        run.set(field, value)
        with pytest.raises(CheckpointError, match=rf"{w}/checkpoints/4: saved with another data stream \({change}\)"):
            fit(run, str(w), resume=True, progress=False)

    damage(w / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING):
        resumed = fit(tiny_run(corpus, 6), str(w), resume=True, progress=False)
    assert resumed.start_step == 2 and list(resumed.damaged) == [4]
    assert re.search(r"checkpoint step 4 is damaged, set aside as .*/4\.damaged: .*/4/state: cannot be restored",
                     caplog.text)
    assert resumed.losses[:2] == first.losses[2:]  # the same steps 3, 4 again, from step 2
    assert sorted(p.name for p in (w / "checkpoints").iterdir()) == ["4", "4.damaged", "6"]
    assert list(losses_of(w)) == [1, 2, 3, 4, 5, 6]

    damage(w / "checkpoints" / "6", "meta")
    damage(w / "checkpoints" / "4")
    with pytest.raises(CheckpointError, match=r"checkpoints: no checkpoint restores: step 6: .*/6/meta: unreadable "
                                              r"\(.*\); step 4: .*/4/state: cannot be restored"):
        fit(tiny_run(corpus, 8), str(w), resume=True, progress=False)


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


def test_sigkill_during_async_save_resumes_from_last_complete(tmp_path):
    corpus = text_corpus(tmp_path)
    workdir = tmp_path / "killed"
    script = KILLER.format(tests=str(Path(__file__).parent), corpus=str(corpus), workdir=str(workdir))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = workdir / "checkpoints"
    complete = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert 2 in complete and max(complete) <= 4, sorted(os.listdir(ckpts))
    resumed = fit(tiny_run(corpus, 6), str(workdir), resume=True, progress=False)
    assert resumed.start_step == max(complete)
    straight = fit(tiny_run(corpus, 6), str(tmp_path / "straight"), progress=False)
    assert resumed.losses == straight.losses[resumed.start_step:]
    a, b = params_of(straight), params_of(resumed)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=str(k))


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
    want = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(m1_jax.from_pretrained(dst), nnx.Param))}
    got = params_of(summary)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k].astype(got[k].dtype), err_msg=str(k))
