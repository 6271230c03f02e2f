"""The records a converted checkpoint directory carries besides its arrays.

``m1_checkpoint.json``: what the directory holds (layout version, key-table digest, source, dtype,
config and source fingerprints), written before any array so a rerun with other options or another
model is refused. ``convert_manifest.jsonl``: one line per finished source tensor with the CRC-32C
checksums of what was written (``--resume`` skips those). ``COMPLETE``: written last, atomically (a
temporary file, synced, then renamed), holding :data:`COMPLETE_TEXT`; a loader refuses a directory without
it, and a marker with other contents (what a crash or a full disk leaves of one written in place) counts
as absent.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import time

import google_crc32c
import numpy as np

from m1_jax.checkpoint_io import files
from m1_jax.checkpoint_io import keys as key_table
from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.config import M1Config

CHECKSUM = "crc32c"  # of each placement's written bytes, in C order
LAYOUT_VERSION = 1  # the NNX state layout (stacked periods, stacked experts, Flax [in, out])
FORMAT = "m1-jax-orbax"
RECORD_FILE = "m1_checkpoint.json"
MANIFEST_FILE = "convert_manifest.jsonl"
COMPLETE_FILE = "COMPLETE"
COMPLETE_TEXT = "conversion complete\n"
STATE_DIR = "state"  # the Orbax PyTree checkpoint inside the directory


class IncompleteCheckpointError(CheckpointError):
    """A converted directory whose conversion has not finished."""


def key_table_digest() -> str:
    """Changes whenever a canonical row of the key table changes (checkpoints record it).

    Alias rows (other writers' names for the same weights) do not change what a checkpoint holds.
    """
    rows = [(r.hf, r.param, r.layout.__name__, r.shape, r.layer_type) for r in key_table.KEY_TABLE if r.canonical]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def source_fingerprint(cfg: M1Config, src) -> str:
    """Digest of the config and of every source tensor's name, dtype and shape."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    for key in sorted(src.keys()):
        info = src.info(key)
        h.update(f"{key}|{info.dtype.name}|{list(info.shape)}\n".encode())
    return h.hexdigest()[:16]


def make_record(cfg: M1Config, src, source_path: str, dtype_name: str) -> dict:
    return {"format": FORMAT, "layout_version": LAYOUT_VERSION, "key_table": key_table_digest(),
            "dtype": dtype_name, "source": os.path.abspath(source_path),
            "source_fingerprint": source_fingerprint(cfg, src),
            "config_fingerprint": hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True,
                                                            default=str).encode()).hexdigest()[:16],
            "state_dir": STATE_DIR, "checksum": CHECKSUM}


# Fields that must agree for two conversions to share a directory (``source`` may move).
_MUST_MATCH = ("format", "layout_version", "key_table", "dtype", "source_fingerprint", "checksum")


def read_record(path: str) -> dict | None:
    try:
        return files.read_json(os.path.join(path, RECORD_FILE))
    except FileNotFoundError:
        return None


def is_complete(path: str) -> bool:
    """Whether ``path`` holds a whole ``COMPLETE`` marker (an empty or cut-short one does not count)."""
    try:
        with open(os.path.join(path, COMPLETE_FILE), "rb") as f:
            return f.read(len(COMPLETE_TEXT) + 1) == COMPLETE_TEXT.encode()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return False


def mark_complete(path: str) -> None:
    """Writes the ``COMPLETE`` marker atomically: either the whole marker is there afterwards, or none."""
    files.write_atomic(os.path.join(path, COMPLETE_FILE), COMPLETE_TEXT)


def is_converted(path: str) -> bool:
    """Whether ``path`` is (or is becoming) a converted checkpoint directory."""
    return os.path.isfile(os.path.join(os.fspath(path), RECORD_FILE))


def differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in _MUST_MATCH if old.get(k) != new.get(k)]


def check_loadable(path: str) -> dict:
    """The record of a complete converted directory whose layout this code reads; clear errors otherwise."""
    record = read_record(path)
    if record is None:
        raise CheckpointError(f"{path}: no {RECORD_FILE}; not a checkpoint written by `m1 convert`")
    if not is_complete(path):
        raise IncompleteCheckpointError(f"{path}: the conversion did not finish (no whole {COMPLETE_FILE} marker); "
                                        "rerun `m1 convert ... --resume`")
    if record.get("format") != FORMAT or record.get("layout_version") != LAYOUT_VERSION:
        raise CheckpointError(f"{path}/{RECORD_FILE}: layout {record.get('format')} v{record.get('layout_version')}, "
                              f"this code reads {FORMAT} v{LAYOUT_VERSION}; reconvert from the source")
    if record.get("key_table") != key_table_digest():
        raise CheckpointError(f"{path}/{RECORD_FILE}: written with key table {record.get('key_table')}, this "
                              f"code has {key_table_digest()}; reconvert from the source")
    return record


class Manifest:
    """Record of finished source tensors: ``{"key": ..., "crc32c": [per placement]}`` per line.

    Finished tensors are buffered and recorded every :attr:`interval` seconds (and on close) after a
    file-system sync, so a recorded tensor's chunks are on disk even after a power loss; a kill loses
    at most the unrecorded ones, which a resume redoes.
    """

    def __init__(self, path: str, interval: float = 30.0):
        self.file = os.path.join(path, MANIFEST_FILE)
        self.interval = interval
        if os.path.isfile(self.file):
            with open(self.file, "rb") as f:
                data = f.read()
            whole = data[: data.rfind(b"\n") + 1]
            if whole != data:  # a line cut short by a kill: drop it (that tensor is redone)
                with open(self.file, "wb") as f:
                    f.write(whole)
        self.done = read_manifest(path)
        self._pending: list[str] = []
        self._last = time.monotonic()

    def add(self, key: str, crcs: list[int]) -> None:
        self._pending.append(json.dumps({"key": key, CHECKSUM: crcs}) + "\n")
        self.done[key] = crcs
        if time.monotonic() - self._last >= self.interval:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self._pending:
            return
        sync_filesystem(self.file)  # the chunks of every pending tensor reach the disk before the record
        with open(self.file, "a") as f:
            f.write("".join(self._pending))
            f.flush()
            os.fsync(f.fileno())
        self._pending = []

    def close(self, *, failed: bool = False) -> None:
        """Records the finished tensors. ``failed``: the conversion is stopping on an error, which a
        failure to record (e.g. the same full disk) must not hide; those tensors are redone on resume."""
        try:
            self.flush()
        except OSError:
            if not failed:
                raise


def read_manifest(path: str) -> dict[str, list[int]]:
    """``{source key: [CRC-32C per placement]}`` of the finished tensors recorded in ``path``'s manifest
    (complete lines only: a line a kill cut short is not a record)."""
    file = os.path.join(path, MANIFEST_FILE)
    try:
        with open(file, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}
    done = {}
    for i, line in enumerate(data[: data.rfind(b"\n") + 1].decode(errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
            done[row["key"]] = [int(c) for c in row[CHECKSUM]]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{file}: line {i} is not a record of a finished tensor ({e})") from None
    return done


def sync_filesystem(path: str) -> None:
    """Flushes the file system holding ``path`` (``syncfs`` on Linux; ``sync`` elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            if libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
    os.sync()


def checksum(array, value: int = 0) -> int:
    """Running CRC-32C (hardware-accelerated, ~11 GB/s) of an array's bytes in C order, continuing ``value``."""
    return google_crc32c.extend(value, np.ascontiguousarray(array).reshape(-1).view(np.uint8))
