"""The small files of checkpoint directories (records, markers, JSON metadata): read with errors that
name the file, written atomically."""

from __future__ import annotations

import json
import os

from m1_jax.checkpoint_io.errors import CheckpointError


def read_json(path: str):
    """The JSON value in file ``path``; :class:`CheckpointError` naming the file when it is not JSON
    (``FileNotFoundError`` when it is missing, for the caller to say what that means)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is damaged") from None


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` as ``path`` through a synced temporary file renamed over it (the rename synced too):
    a crash or a full disk leaves the old file or none, never a partial one, and no temporary file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    sync_directory(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1))


def sync_directory(path: str) -> None:
    """Makes the entries of directory ``path`` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
