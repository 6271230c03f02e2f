"""Checkpoint I/O below the model: JAX-free imports, the buffer pool, lazy tensor reads, opening a source,
the complete marker, telling the kinds of checkpoint directory apart."""

import json
import pkgutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import m1_jax.checkpoint_io
from m1_jax.checkpoint_io.buffers import PAGE, BufferPool, aligned_empty
from m1_jax.checkpoint_io import manifest as mf
from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.checkpoint_io.locate import locate
from m1_jax.checkpoint_io.safetensors_io import SafetensorsCheckpoint
from m1_jax.checkpoint_io.sources import open_source


def test_checkpoint_io_loads_neither_jax_nor_the_layers_above():
    """Every module of the package imports without JAX and without the model, loader or converter."""
    names = [f"m1_jax.checkpoint_io.{m.name}" for m in pkgutil.iter_modules(m1_jax.checkpoint_io.__path__)]
    assert {"m1_jax.checkpoint_io.keys", "m1_jax.checkpoint_io.safetensors_io"} <= set(names)
    code = (f"import sys; import {', '.join(names)}; "
            "above = ('jax', 'flax', 'm1_jax.model', 'm1_jax.layers', 'm1_jax.convert', 'm1_jax.loading'); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in above[:2] or m.startswith(above[2:])); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_aligned_buffers_start_on_a_page():
    for n in (1, 100, PAGE + 1):
        a = aligned_empty(n)
        assert a.ctypes.data % PAGE == 0 and a.nbytes == n and a.flags.writeable


def test_buffer_pool_stays_under_its_limit_and_serves_an_oversized_request_alone():
    pool, peak, lock = BufferPool(limit=1000), [0], threading.Lock()

    def job(n):
        with pool.take(n) as buf:
            assert buf.nbytes == n
            with lock:
                peak[0] = max(peak[0], pool.allocated)
            time.sleep(0.005)

    threads = [threading.Thread(target=job, args=(n,)) for n in [300, 400, 500, 200, 600, 1500, 100] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.allocated <= 1500 and peak[0] <= 1500  # above 1000 only while the 1500-byte request ran alone
    with pool.take(100) as a:  # an idle buffer is reused rather than allocated
        before = pool.allocated
    with pool.take(100) as b:
        assert pool.allocated == before and a.ctypes.data == b.ctypes.data


@pytest.mark.parametrize("direct", [False, True])
def test_read_into_reuses_the_buffer_and_reports_truncation(golden_dir, tmp_path, direct):
    src = SafetensorsCheckpoint(golden_dir / "sharded", direct=direct)
    for key in src.keys():  # every tensor: starts anywhere in a page, in every shard
        buf = aligned_empty(src.info(key).nbytes + src.read_slack)
        x = src.read_into(key, buf)
        assert buf.ctypes.data <= x.ctypes.data < buf.ctypes.data + buf.nbytes
        np.testing.assert_array_equal(x, SafetensorsCheckpoint(golden_dir / "sharded").read(key))
        src.prefetch(key)
    with pytest.raises(ValueError, match="buffer of 3 bytes"):
        src.read_into(key, buf[:3])
    import shutil

    copy = tmp_path / "sharded"
    shutil.copytree(golden_dir / "sharded", copy)
    short = SafetensorsCheckpoint(copy, direct=direct)
    key = max(short.keys(), key=lambda k: short.info(k).nbytes)
    info = short.info(key)
    with open(info.file, "r+b") as f:  # cut short after the header was checked
        f.truncate(info.start + 4)
    with pytest.raises(CheckpointError, match="truncated while reading"):
        short.read_into(key, aligned_empty(info.nbytes + short.read_slack))
    with pytest.raises(CheckpointError, match="truncated while reading"):
        short.read(key)


def test_open_source_picks_the_reader_by_the_files(golden_dir, tmp_path):
    assert isinstance(open_source(str(golden_dir / "sharded")), SafetensorsCheckpoint)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read PyTorch|PyTorch .bin checkpoints need"):
        open_source(str(bin_dir))  # the .bin reader was chosen: it refuses the empty file (or asks for torch)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: no \\*.safetensors or PyTorch \\*.bin files"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="nowhere: not a checkpoint directory"):
        open_source(str(tmp_path / "nowhere"))


def test_the_complete_marker_counts_only_when_whole(tmp_path):
    assert not mf.is_complete(str(tmp_path))
    for text in ("", "conversion comp"):  # what a full disk or a crash leaves of a marker written in place
        (tmp_path / mf.COMPLETE_FILE).write_text(text)
        assert not mf.is_complete(str(tmp_path)), text
    mf.mark_complete(str(tmp_path))
    assert mf.is_complete(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [mf.COMPLETE_FILE]  # no temporary file left


def _train_step(workdir, name, tokenizer="byte"):
    step = workdir / "checkpoints" / name
    (step / "state").mkdir(parents=True)
    (step / "meta").mkdir()
    layers = 2 + len(name)  # tells the steps apart
    config = {**TINY, "num_hidden_layers": layers, "attn_type_list": [0] * (layers - 1) + [1]}
    meta = {"config": config, "run": {"data": {"tokenizer": tokenizer}}}
    (step / "meta" / "metadata").write_text(json.dumps(meta))
    return step


TINY = {"vocab_size": 512, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2, "rotary_dim": 8,
        "block_size": 16}


def test_locate_tells_the_kinds_of_checkpoint_apart(golden_dir, tmp_path):
    hf = locate(golden_dir / "sharded")
    assert (hf.kind, hf.directory, hf.tokenizer) == ("huggingface", str(golden_dir / "sharded"),
                                                      str(golden_dir / "sharded"))
    w = tmp_path / "run"
    for name in ("3", "10", "2"):
        _train_step(w, name)
    for name in ("11.damaged", "12.orbax-checkpoint-tmp-5"):  # set aside, unfinished: not steps
        (w / "checkpoints" / name / "meta").mkdir(parents=True)
    for path in (w, w / "checkpoints"):
        got = locate(path)
        assert (got.kind, got.step, got.directory) == ("training", 10, str(w / "checkpoints" / "10")), path
        assert got.tokenizer == "byte" and got.config().num_hidden_layers == 4
    got = locate(w / "checkpoints" / "3")
    assert (got.kind, got.step, got.config().num_hidden_layers) == ("training", 3, 3)
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"fresh/checkpoints: no checkpoint saved yet"):
        locate(tmp_path / "fresh")
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError, match=r"other: not a checkpoint directory: no config.json .* no checkpoints/"):
        locate(tmp_path / "other")
    with pytest.raises(CheckpointError, match="nowhere: no such checkpoint directory"):
        locate(tmp_path / "nowhere")


def test_reports_of_reads_abandoned_by_a_failed_restore_are_dropped(capsys):
    """A read that completes into the closed event loop of a failed Orbax restore is not reported (a
    damaged checkpoint gave hundreds of such tracebacks); any other unraisable report still is."""
    import asyncio
    import sys

    from m1_jax.checkpoint_io.errors import ignore_abandoned_reads

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(lambda: None)
    except RuntimeError as e:
        abandoned = e

    class Unraisable:  # an exception in __del__ reaches sys.unraisablehook, as TensorStore's reports do
        def __init__(self, e):
            self.e = e

        def __del__(self):
            raise self.e

    previous = sys.unraisablehook
    try:
        sys.unraisablehook = sys.__unraisablehook__
        ignore_abandoned_reads()
        ignore_abandoned_reads()  # once per process: not wrapped twice
        assert sys.unraisablehook.drops_abandoned_reads
        assert sys.unraisablehook.__closure__[0].cell_contents is sys.__unraisablehook__
        Unraisable(abandoned)
        assert "Event loop is closed" not in capsys.readouterr().err
        Unraisable(RuntimeError("Event loop is closed"))  # the same words from elsewhere: still reported
        Unraisable(RuntimeError("something else"))
        err = capsys.readouterr().err
        assert "Event loop is closed" in err and "something else" in err
    finally:
        sys.unraisablehook = previous
