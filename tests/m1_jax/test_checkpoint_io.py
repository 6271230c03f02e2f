"""Conversion I/O pieces: chunk files written with and without direct I/O, the buffer pool, tensor reads."""

import threading
import time

import numpy as np
import pytest

from m1_jax.convert import orbax_writer as ow
from m1_jax.convert.buffers import PAGE, BufferPool, aligned_empty
from m1_jax.convert.safetensors_io import CheckpointError, SafetensorsCheckpoint


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("nbytes", [1, PAGE - 1, PAGE, 3 * PAGE + 17, 5 * PAGE])
@pytest.mark.parametrize("offset", [0, 8])
def test_write_file_writes_exactly_the_bytes(tmp_path, monkeypatch, direct, nbytes, offset):
    monkeypatch.setattr(ow, "_direct_io", [direct])
    buf = aligned_empty(nbytes + offset)
    buf[:] = np.random.default_rng(nbytes).integers(0, 256, size=buf.shape, dtype=np.uint8)
    path = tmp_path / "chunk"
    path.write_bytes(b"x" * (10 * PAGE))  # an older, longer file is replaced whole
    ow.write_file(str(path), buf[offset:])
    assert path.read_bytes() == buf[offset:].tobytes()


def test_write_chunk_pads_the_edge_chunk(tmp_path):
    value = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    ow.write_chunk(str(tmp_path), (0, 1, 0), value, (1, 4, 3))
    got = np.frombuffer((tmp_path / "0.1.0").read_bytes(), np.float32).reshape(1, 4, 3)
    np.testing.assert_array_equal(got[:, :2], value)
    assert not got[:, 2:].any()


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
