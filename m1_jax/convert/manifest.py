"""The records a converted checkpoint directory carries besides its arrays.

``m1_checkpoint.json``: what the directory holds (layout version, key-table digest, source, dtype,
config and source fingerprints), written before any array so a rerun with other options or another
model is refused. ``convert_manifest.jsonl``: one line per finished source tensor with the checksums
of what was written (``--resume`` skips those). ``COMPLETE``: written last; a loader refuses a
directory without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib

from m1_jax.config import M1Config
from m1_jax.convert import keys as key_table
from m1_jax.convert.safetensors_io import CheckpointError

LAYOUT_VERSION = 1  # the NNX state layout (stacked periods, stacked experts, Flax [in, out])
FORMAT = "m1-jax-orbax"
RECORD_FILE = "m1_checkpoint.json"
MANIFEST_FILE = "convert_manifest.jsonl"
COMPLETE_FILE = "COMPLETE"
STATE_DIR = "state"  # the Orbax PyTree checkpoint inside the directory


class IncompleteCheckpointError(CheckpointError):
    """A converted directory whose conversion has not finished."""


def key_table_digest() -> str:
    """Changes whenever a row of the key table changes (checkpoints record it)."""
    rows = [(r.hf, r.param, r.layout.__name__, r.shape, r.layer_type, r.canonical) for r in key_table.KEY_TABLE]
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
            "state_dir": STATE_DIR}


# Fields that must agree for two conversions to share a directory (``source`` may move).
_MUST_MATCH = ("format", "layout_version", "key_table", "dtype", "source_fingerprint")


def read_record(path: str) -> dict | None:
    try:
        with open(os.path.join(path, RECORD_FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{os.path.join(path, RECORD_FILE)}: unreadable ({e})") from None


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_FILE))


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
        raise IncompleteCheckpointError(f"{path}: the conversion did not finish (no {COMPLETE_FILE}); "
                                        "rerun `m1 convert ... --resume`")
    if record.get("format") != FORMAT or record.get("layout_version") != LAYOUT_VERSION:
        raise CheckpointError(f"{path}/{RECORD_FILE}: layout {record.get('format')} v{record.get('layout_version')}, "
                              f"this code reads {FORMAT} v{LAYOUT_VERSION}; reconvert from the source")
    if record.get("key_table") != key_table_digest():
        raise CheckpointError(f"{path}/{RECORD_FILE}: written with key table {record.get('key_table')}, this "
                              f"code has {key_table_digest()}; reconvert from the source")
    return record


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Manifest:
    """Append-only record of finished source tensors: ``{"key": ..., "crc32": [per placement]}``."""

    def __init__(self, path: str):
        self.file = os.path.join(path, MANIFEST_FILE)
        self.done: dict[str, list[int]] = {}
        if os.path.isfile(self.file):
            with open(self.file) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill: that tensor is redone
                        continue
                    self.done[row["key"]] = row["crc32"]
        self._f = None

    def add(self, key: str, crcs: list[int]) -> None:
        if self._f is None:
            self._f = open(self.file, "a")
        self._f.write(json.dumps({"key": key, "crc32": crcs}) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done[key] = crcs

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def crc32(array, value: int = 0) -> int:
    """Running CRC-32 of an array's bytes (C order)."""
    import numpy as np

    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8), value)
