"""Checkpoint I/O below the model: JAX-free imports, the buffer pool, lazy tensor reads, opening a source."""

import pkgutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import m1_jax.checkpoint_io
from m1_jax.checkpoint_io.buffers import PAGE, BufferPool, aligned_empty
from m1_jax.checkpoint_io.errors import CheckpointError
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
