"""The `m1 train` workdir: one run at a time (a lock that a killed run does not leave behind), a fresh
workdir by default, `--resume` only where there is a run, and a metrics history that survives a kill
while a resume rewrites it. None of these compiles a model."""

import json
import logging
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from m1_jax import cli, distributed, train_loop
from m1_jax.data import DataError
from m1_jax.run_config import RunConfig

REPO = Path(__file__).resolve().parents[2]


def unreadable_run(tmp_path) -> RunConfig:
    """A run whose data source does not exist: fit fails with DataError as soon as it gets that far."""
    run = RunConfig()
    run.data.source = str(tmp_path / "no-such-corpus")
    return run


HOLDER = textwrap.dedent("""
    import sys, time
    from m1_jax.train_loop import WorkdirLock
    with WorkdirLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(300)
""")


def test_second_run_in_a_workdir_fails_naming_the_holder(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read() if holder.poll() else ""
        with pytest.raises(train_loop.WorkdirError,
                           match=rf"^{re.escape(str(workdir))}: in use by another `m1 train` \(pid {holder.pid} on "):
            train_loop.fit(unreadable_run(tmp_path), str(workdir), progress=False)
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the killed holder's lock: the next run gets past it (to the missing data).
    with pytest.raises(DataError):
        train_loop.fit(unreadable_run(tmp_path), str(workdir), progress=False)


def test_resume_needs_a_run_to_continue(tmp_path, caplog):
    with pytest.raises(train_loop.WorkdirError, match=r"--resume: .*typo does not exist"):
        train_loop.fit(unreadable_run(tmp_path), str(tmp_path / "typo"), resume=True, progress=False)
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING), pytest.raises(DataError):
        train_loop.fit(unreadable_run(tmp_path), str(tmp_path / "empty"), resume=True, progress=False)
    assert re.search(r"--resume: .*empty/checkpoints holds no checkpoint; starting from step 0", caplog.text)


def test_m1_train_twice_uses_a_fresh_workdir_each_time(tmp_path, monkeypatch, capsys):
    workdirs = []

    def fake_fit(run, workdir, **kw):
        workdirs.append(workdir)
        return train_loop.Summary()

    monkeypatch.setattr(train_loop, "fit", fake_fit)
    monkeypatch.setattr(distributed, "setup", lambda **kw: None)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # within the same second, most likely
        assert cli.main(["train", "--no-sample", "--no-progress"]) == 0
        assert capsys.readouterr().out.startswith(f"workdir: {workdirs[-1]}\n")
    assert len(set(workdirs)) == 2
    for w in workdirs:
        assert re.fullmatch(r"runs/demo-\d{8}-\d{6}(-\d+)?", w) and (tmp_path / w).is_dir()
    assert cli.main(["train", "--no-sample", "--workdir", "runs/mine"]) == 0 and workdirs[-1] == "runs/mine"
    assert cli.main(["train", "--resume"]) == 2
    assert f"--resume: name the run to continue with --workdir (the newest here: --workdir {max(workdirs[:2])})" \
        in capsys.readouterr().err


KILLED_MID_REWRITE = textwrap.dedent("""
    import resource, signal, sys
    from m1_jax import train_loop
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Writing past 200 bytes raises SIGXFSZ, which (Python ignores it by default) kills the process mid-write.
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))
    train_loop.metrics_file(sys.argv[1], 8)
""")


def test_metrics_history_survives_a_kill_during_the_resume_rewrite(tmp_path):
    lines = [json.dumps({"step": i, "loss": 1.0 / i, "lr": 0.001}) + "\n" for i in range(1, 11)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(lines))
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_REWRITE, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr[-2000:]
    assert metrics.read_text() == "".join(lines)
    train_loop.metrics_file(str(tmp_path), 8).close()  # a rewrite that completes keeps steps 1..8
    assert metrics.read_text() == "".join(lines[:8])
