"""Writing an Orbax PyTree checkpoint one region at a time, and reading its arrays back the same way.

The checkpoint is the one ``orbax.checkpoint.StandardCheckpointer`` writes with ``use_ocdbt=False``:
one zarr (v2, uncompressed) array per parameter in a directory named after its tree path, plus the
``_METADATA`` tree record and ``_CHECKPOINT_METADATA``. Arrays are created empty with TensorStore
(nothing allocated in memory) and filled region by region, so the host never holds a whole stacked
tensor. Chunks are one slot (period[, expert]) split along the next axis into pieces of at most
:data:`CHUNK_BYTES`; a piece that is one whole chunk is written as that chunk's file
(:meth:`ChunkWriter.write_chunk`), any other region with a TensorStore write of just that region.

:func:`open_array` reads arrays of any Orbax PyTree checkpoint (also OCDBT / zarr3 ones written by
Orbax itself), region by region.
"""

from __future__ import annotations

import errno
import json
import os
import time

import numpy as np
import tensorstore as ts

from m1_jax.checkpoint_io import files
from m1_jax.checkpoint_io.buffers import PAGE, aligned_empty
from m1_jax.checkpoint_io.errors import CheckpointError

CHUNK_BYTES = 64 << 20  # target size of one zarr chunk (and of one write)
METADATA_FILE = "_METADATA"
CHECKPOINT_METADATA_FILE = "_CHECKPOINT_METADATA"
HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"


VALUE = "value"  # NNX flattens a Variable to its value: every parameter's tree path ends in it


def param_name(path: tuple) -> str:
    """The Orbax parameter name of the NNX state path ``path`` (``periods.layers.3.self_attn.q_proj.value``)."""
    return ".".join(map(str, path)) + "." + VALUE


def param_entries(shapes: dict[tuple, tuple[int, ...]]) -> list[tuple[tuple, str, list, tuple[int, ...]]]:
    """``(tree path, orbax name, key metadata, shape)`` per parameter, as Orbax names the leaves of an NNX
    state of these parameters (nested dicts, each ending in the Variable's value); no JAX needed (tests
    compare it with the flattened state of the model)."""
    out = []
    for path, shape in shapes.items():
        names = tuple(map(str, path)) + (VALUE,)
        out.append((names, param_name(path), [{"key": n, "key_type": 2} for n in names], tuple(shape)))
    return out


def chunk_shape(shape: tuple[int, ...], n_slot_dims: int, itemsize: int) -> tuple[int, ...]:
    """One slot (leading ``n_slot_dims`` axes of size 1), the next axis cut to <= CHUNK_BYTES pieces."""
    shape = tuple(shape)
    lead, rest = (1,) * n_slot_dims, shape[n_slot_dims:]
    if not rest:
        return lead
    row = int(np.prod(rest[1:], dtype=np.int64)) * itemsize
    rows = max(1, min(rest[0], CHUNK_BYTES // max(row, 1)))
    return lead + (rows,) + rest[1:]


def _zarr_dtype(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    return "bfloat16" if dtype.name == "bfloat16" else dtype.str


def create_array(directory: str, name: str, shape, dtype, chunks) -> ts.TensorStore:
    """Creates (or, when resuming, opens the existing identical) zarr array ``directory/name``."""
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": os.path.join(directory, name)},
        "metadata": {"shape": list(shape), "chunks": list(chunks), "dtype": _zarr_dtype(dtype),
                     "compressor": None, "fill_value": None, "order": "C", "dimension_separator": "."},
    }
    return ts.open(spec, create=True, open=True, context=_CONTEXT).result()


# No fsync per chunk: the converter syncs the file system before it records finished tensors
# (manifest.Manifest) and before it marks the checkpoint complete.
_CONTEXT = ts.Context({"file_io_sync": False})


def write_metadata(directory: str, entries: list[tuple[tuple, str, list, tuple[int, ...]]]) -> None:
    """The two records Orbax restores from (:func:`param_entries`); written last, after every array."""
    tree = {}
    for path, _, key_md, shape in entries:
        tree[str(path)] = {"key_metadata": key_md,
                           "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                                              "write_shape": list(shape)}}
    meta = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
    now = time.time_ns()
    ckpt_meta = {"item_handlers": HANDLER, "metrics": {}, "performance_metrics": {},
                 "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now, "custom_metadata": {}}
    for fname, obj in ((METADATA_FILE, meta), (CHECKPOINT_METADATA_FILE, ckpt_meta)):
        files.write_atomic(os.path.join(directory, fname), json.dumps(obj))


def read_metadata(directory: str) -> dict:
    """The tree record ``_METADATA`` of the Orbax checkpoint in ``directory`` (errors name the file)."""
    path = os.path.join(directory, METADATA_FILE)
    try:
        meta = files.read_json(path)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: not an Orbax checkpoint (no {METADATA_FILE})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tree_metadata"), dict):
        raise CheckpointError(f"{path}: not an Orbax tree record (no tree_metadata); the file is damaged")
    return meta


def open_array(directory: str, name: str, meta: dict | None = None) -> ts.TensorStore:
    """Opens parameter ``name`` of the Orbax checkpoint in ``directory`` for region reads."""
    meta = read_metadata(directory) if meta is None else meta
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    if meta.get("use_ocdbt"):
        kvstore = {"driver": "ocdbt", "base": f"file://{os.path.abspath(directory)}", "path": name}
    else:
        kvstore = {"driver": "file", "path": os.path.join(directory, name)}
    return ts.open({"driver": driver, "kvstore": kvstore}, open=True).result()


class ChunkWriter:
    """Writes whole chunks of uncompressed zarr v2 arrays (:func:`create_array`) as files.

    The page-aligned bulk of a page-aligned buffer is written with ``O_DIRECT``: straight from the
    buffer to the device, without filling (and on a VM, faulting in) page-cache pages that a
    conversion never reads again. ``direct``: whether to try that; it turns off for the rest of this
    writer's life the first time the file system refuses direct I/O (tmpfs, some network file
    systems), and writes then go through the page cache. One writer serves one conversion (its
    threads share it: the flag only ever goes from on to off).
    """

    def __init__(self, direct: bool = True):
        self.direct = direct and hasattr(os, "O_DIRECT")

    def write_chunk(self, array_dir: str, coords: tuple[int, ...], value: np.ndarray,
                    chunks: tuple[int, ...]) -> None:
        """Writes one whole chunk of the array in ``array_dir`` at chunk coordinates ``coords``.

        An uncompressed chunk is its C-order bytes, always of the full chunk shape (the edge chunk is
        padded with zeros). Written in place: a chunk a kill cuts short belongs to a source tensor the
        manifest has not recorded, which ``--resume`` writes again whole, and a checkpoint is only
        loaded once marked complete. (TensorStore never reads these chunks back to merge a partial
        write: a parameter's chunks are written either whole, here, or by TensorStore.)
        """
        if value.shape != tuple(chunks):
            padded = aligned_empty(int(np.prod(chunks, dtype=np.int64)) * value.dtype.itemsize).view(value.dtype)
            padded = padded.reshape(chunks)
            padded[...] = 0
            padded[tuple(slice(0, n) for n in value.shape)] = value
            value = padded
        path = os.path.join(array_dir, ".".join(map(str, coords)))
        self.write_file(path, np.ascontiguousarray(value).reshape(-1).view(np.uint8))

    def write_file(self, path: str, data: np.ndarray) -> None:
        """Writes the bytes ``data`` (uint8) as the new file ``path``.

        Direct I/O where it can (see the class), the rest through the page cache. Durability comes
        from the file-system sync that precedes every manifest record.
        """
        n_direct = len(data) // PAGE * PAGE if self.direct and data.ctypes.data % PAGE == 0 else 0
        if n_direct:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
                try:
                    _write_all(fd, data[:n_direct], 0)
                finally:
                    os.close(fd)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: the file system takes no direct I/O
                    raise
                self.direct, n_direct = False, 0
        if n_direct == len(data):
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if n_direct else os.O_TRUNC), 0o644)
        try:
            _write_all(fd, data[n_direct:], n_direct)
        finally:
            os.close(fd)


def _write_all(fd: int, data: np.ndarray, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
