"""Lazy reading of safetensors checkpoints, one tensor at a time.

Only the JSON header of each shard is parsed up front; a tensor's bytes are read when asked for,
so peak memory is one tensor. bfloat16 (which numpy cannot name) is viewed as ``ml_dtypes.bfloat16``.
A checkpoint directory holds ``model.safetensors``, or shards listed by
``model.safetensors.index.json``, or (without an index) every ``*.safetensors`` file in it.
"""

from __future__ import annotations

import abc
import errno
import json
import os
import struct
import threading
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from m1_jax.checkpoint_io.buffers import PAGE
from m1_jax.checkpoint_io.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parses one shard's header, checking that every tensor lies inside the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if meta["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor '{key}' has unsupported dtype {meta['dtype']}")
        dtype = DTYPES[meta["dtype"]]
        shape = tuple(meta["shape"])
        begin, end = meta["data_offsets"]
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor '{key}' byte range does not match its shape {shape}")
        start = 8 + n + begin
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: truncated: tensor '{key}' ends at byte {8 + n + end} "
                                  f"but the file has {size}")
        out[key] = TensorInfo(path, dtype, shape, start, end - begin)
    return out


def read_weight_map(index: str) -> dict[str, str]:
    """The ``weight_map`` (tensor key -> shard file) of a checkpoint index file."""
    with open(index) as f:
        try:
            return json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a checkpoint index with a 'weight_map' ({e})") from None


class LazyCheckpoint(abc.ABC):
    """What the lazy readers share: ``path``, ``tensors`` ({key: :class:`TensorInfo`}) and ``read(key)``."""

    path: str
    tensors: dict[str, TensorInfo]

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    @abc.abstractmethod
    def read(self, key: str) -> np.ndarray:
        """One tensor as stored (dtype and shape)."""

    read_slack = 0  # bytes :meth:`read_into` needs beyond the tensor's own

    def read_into(self, key: str, buf: np.ndarray) -> np.ndarray:
        """Like :meth:`read`; readers that can place the bytes in ``buf`` (uint8, at least ``nbytes``
        + :attr:`read_slack` long) do, so a caller reusing one buffer avoids a fresh allocation per tensor."""
        return self.read(key)

    def prefetch(self, key: str) -> None:
        """Hints that ``key`` will be read soon (readers of plain files start reading ahead)."""

    def readahead(self, nbytes: int) -> None:
        """Hints that the first ``nbytes`` of tensor data, in file order, will be read soon."""


class SafetensorsCheckpoint(LazyCheckpoint):
    """All tensors of a checkpoint directory, read lazily through the index.

    ``direct=True``: :meth:`read_into` a page-aligned buffer reads with ``O_DIRECT``, straight from the
    device into the buffer, bypassing the page cache (a conversion reads every byte once: caching it
    only costs memory and, on a VM, page faults), except what :meth:`readahead` asked the OS to cache;
    where the file system refuses direct I/O, reads fall back to the page cache.
    """

    def __init__(self, path: str | os.PathLike, direct: bool = False):
        path = os.fspath(path)
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        index = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index):
            weight_map = read_weight_map(index)
            shards = sorted(set(weight_map.values()))
            headers = {}
            for shard in shards:
                headers[shard] = read_header(os.path.join(path, shard))
            for key, shard in weight_map.items():
                if key not in headers[shard]:
                    raise CheckpointError(f"{index}: names tensor '{key}' in {shard}, which does not hold it")
                self.tensors[key] = headers[shard][key]
        else:
            single = os.path.join(path, SINGLE_NAME)
            files = [single] if os.path.isfile(single) else sorted(
                os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors files")
            for file in files:
                for key, info in read_header(file).items():
                    if key in self.tensors:
                        raise CheckpointError(f"{file}: tensor '{key}' also appears in {self.tensors[key].file}")
                    self.tensors[key] = info
        self._fds: dict[tuple[str, bool], int] = {}
        self._lock = threading.Lock()
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.read_slack = 2 * PAGE if self.direct else 0
        self._cached: dict[str, int] = {}  # file -> length of its start that readahead() hinted

    def readahead(self, nbytes: int) -> None:
        """Asks the OS to read the first ``nbytes`` of the tensor data, in file order (the order a
        conversion reads it), into the page cache in the background; reads of it then use the cache."""
        if not hasattr(os, "posix_fadvise"):
            return
        for file in sorted({t.file for t in self.tensors.values()}):
            if nbytes <= 0:
                return
            size = os.path.getsize(file)
            os.posix_fadvise(self._fd(file), 0, min(size, nbytes), os.POSIX_FADV_WILLNEED)
            self._cached[file] = min(size, nbytes)
            nbytes -= size

    def _fd(self, file: str, direct: bool = False) -> int:
        with self._lock:
            if (file, direct) not in self._fds:
                self._fds[file, direct] = os.open(file, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            return self._fds[file, direct]

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    def __del__(self):
        if getattr(self, "_fds", None):
            self.close()

    def read(self, key: str) -> np.ndarray:
        """One tensor as stored (dtype and shape), read with positioned reads (safe from many threads)."""
        return self.read_into(key, np.empty(self.tensors[key].nbytes, np.uint8))

    def read_into(self, key: str, buf: np.ndarray) -> np.ndarray:
        t = self.tensors[key]
        buf = buf.reshape(-1).view(np.uint8)
        if (self.direct and buf.ctypes.data % PAGE == 0 and len(buf) >= t.nbytes + self.read_slack
                and t.start + t.nbytes > self._cached.get(t.file, 0)):
            try:
                return self._read_direct(key, t, buf)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: the file system takes no direct I/O
                    raise
                self.direct, self.read_slack = False, 0
        view = buf[: t.nbytes]
        if len(view) < t.nbytes:
            raise ValueError(f"read_into: buffer of {len(view)} bytes for '{key}' of {t.nbytes}")
        fd, done = self._fd(t.file), 0
        while done < t.nbytes:
            n = os.preadv(fd, [view[done:]], t.start + done)
            if n <= 0:
                raise CheckpointError(f"{t.file}: truncated while reading '{key}'")
            done += n
        return view.view(t.dtype).reshape(t.shape)

    def _read_direct(self, key: str, t: TensorInfo, buf: np.ndarray) -> np.ndarray:
        """Reads the page-aligned range around the tensor; returns the tensor's part of it."""
        first = t.start // PAGE * PAGE
        span = -(-(t.start + t.nbytes) // PAGE) * PAGE - first
        fd, done = self._fd(t.file, direct=True), 0
        while done < span:
            n = os.preadv(fd, [buf[done:span]], first + done)
            if n <= 0:
                break
            done += n
            if n % PAGE:  # the end of the file
                break
        if first + done < t.start + t.nbytes:
            raise CheckpointError(f"{t.file}: truncated while reading '{key}'")
        offset = t.start - first
        return buf[offset:offset + t.nbytes].view(t.dtype).reshape(t.shape)

    def prefetch(self, key: str) -> None:
        t = self.tensors[key]
        if hasattr(os, "posix_fadvise") and not self.direct:  # direct reads would read it twice
            os.posix_fadvise(self._fd(t.file), t.start, t.nbytes, os.POSIX_FADV_WILLNEED)
