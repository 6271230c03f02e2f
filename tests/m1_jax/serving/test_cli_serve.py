"""``m1 serve`` as users run it: a process on localhost, stopped by SIGTERM with a request in flight."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from m1_jax import cli
from m1_jax.commands.serve import newest_checkpoint


def test_sigterm_lets_the_request_in_flight_finish(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "m1_jax.cli", "serve", "--port", str(port), "--slots", "2",
                             "--max-context", "128", "--prefill-chunk", "16", "--shutdown-timeout", "60"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny-random"
        body = {"model": "tiny-random", "prompt": "hello", "max_tokens": 100, "temperature": 0, "stream": True}
        events = []
        first = threading.Event()

        def read():
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(120)
        proc.send_signal(signal.SIGTERM)
        reader.join(120)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once it has shut down gracefully: the exit status says SIGTERM
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert "serving the tiny preset with RANDOM weights" in err and "Traceback" not in err
    assert "Finished server process" in err


def test_serve_flags_and_the_default_checkpoint(tmp_path, trained_workdir, capsys):
    assert newest_checkpoint(str(tmp_path / "runs")) is None
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "empty").mkdir()
    os.symlink(trained_workdir, tmp_path / "runs" / "train-tiny")
    assert newest_checkpoint(str(tmp_path / "runs")) == str(tmp_path / "runs" / "train-tiny")
    for flags, says in [(["--slots", "0"], "--slots must be a positive integer, got 0"),
                        (["--prefill-chunk", "24"], "--prefill-chunk must be a power of two >= 16, got 24"),
                        (["--prefix-cache-gb", "-1"], "--prefix-cache-gb must be >= 0, got -1.0"),
                        (["--port", "0"], "--port must be in 1..65535, got 0")]:
        assert cli.main(["serve", *flags]) == 2
        assert f"m1 serve: error: {says}" in capsys.readouterr().err


def test_serve_refuses_a_context_past_the_model_before_loading_it(trained_workdir, monkeypatch, capsys):
    monkeypatch.setattr("m1_jax.distributed.setup", lambda **kw: None)  # JAX is up already in this process
    monkeypatch.setattr("m1_jax.commands.serve.load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    assert cli.main(["serve", str(trained_workdir), "--max-context", "100000"]) == 2
    assert "--max-context 100000 exceeds the model's max_position_embeddings=" in capsys.readouterr().err
