"""Chunk files of the converted checkpoint: written exactly, with and without direct I/O."""

import errno
import os

import numpy as np
import pytest

from m1_jax.checkpoint_io import orbax_layout as ow
from m1_jax.checkpoint_io.buffers import PAGE, aligned_empty


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("nbytes", [1, PAGE - 1, PAGE, 3 * PAGE + 17, 5 * PAGE])
@pytest.mark.parametrize("offset", [0, 8])
def test_write_file_writes_exactly_the_bytes(tmp_path, direct, nbytes, offset):
    buf = aligned_empty(nbytes + offset)
    buf[:] = np.random.default_rng(nbytes).integers(0, 256, size=buf.shape, dtype=np.uint8)
    path = tmp_path / "chunk"
    path.write_bytes(b"x" * (10 * PAGE))  # an older, longer file is replaced whole
    ow.ChunkWriter(direct=direct).write_file(str(path), buf[offset:])
    assert path.read_bytes() == buf[offset:].tobytes()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this system")
def test_a_file_system_refusing_direct_io_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    real_open, direct_opens = os.open, []

    def refuses_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            direct_opens.append(path)
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuses_direct)
    data = aligned_empty(3 * PAGE + 5)
    data[:] = np.arange(data.size) % 251
    writer, other = ow.ChunkWriter(), ow.ChunkWriter()
    writer.write_file(str(tmp_path / "a"), data)
    assert (tmp_path / "a").read_bytes() == data.tobytes() and len(direct_opens) == 1
    assert not writer.direct and other.direct  # the refusal is this writer's, not a process-wide setting
    writer.write_file(str(tmp_path / "b"), data)
    assert (tmp_path / "b").read_bytes() == data.tobytes() and len(direct_opens) == 1  # not tried again
    other.write_file(str(tmp_path / "c"), data)
    assert len(direct_opens) == 2


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this system")
def test_other_errors_of_a_direct_write_are_not_taken_for_a_refusal(tmp_path, monkeypatch):
    def full_disk(path, flags, *args):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(os, "open", full_disk)
    writer = ow.ChunkWriter()
    with pytest.raises(OSError, match="No space left"):
        writer.write_file(str(tmp_path / "a"), aligned_empty(PAGE))
    assert writer.direct


def test_write_chunk_pads_the_edge_chunk(tmp_path):
    value = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    ow.ChunkWriter().write_chunk(str(tmp_path), (0, 1, 0), value, (1, 4, 3))
    got = np.frombuffer((tmp_path / "0.1.0").read_bytes(), np.float32).reshape(1, 4, 3)
    np.testing.assert_array_equal(got[:, :2], value)
    assert not got[:, 2:].any()
