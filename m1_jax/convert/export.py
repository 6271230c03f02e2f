"""``m1 export``: a converted Orbax checkpoint -> Hugging Face safetensors shards with the original names.

Streaming like the conversion: each checkpoint tensor (one slot of a stacked parameter) is read from
its Orbax array region, put back into PyTorch layout (:func:`m1_jax.checkpoint_io.keys.to_checkpoint_layout`)
and appended to the current shard, whose header was written first from the shapes alone. Shards are
written under temporary names and renamed; ``model.safetensors.index.json`` is written last.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
from tqdm.auto import tqdm

from m1_jax.checkpoint_io import keys as key_table
from m1_jax.checkpoint_io import manifest as mf
from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.checkpoint_io.safetensors_io import DTYPE_NAMES, INDEX_NAME
from m1_jax.config import M1Config
from m1_jax.convert import orbax_writer as ow
from m1_jax.convert.layout import TOKENIZER_FILES, targets
from m1_jax.convert.transpose import contiguous_into

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"123"`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"shard size {text!r}: expected a size like 5GB or 500MB")
    unit = (m[2] or "").upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m[1]) * scale)


def _layer_of(key: str) -> int:
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return int(m[1]) if m else (-1 if key.startswith("model.embed_tokens") else 1 << 30)


def _shards(entries: list[tuple[str, tuple, np.dtype]], max_bytes: int) -> list[list]:
    shards, cur, size = [], [], 0
    for key, shape, dtype in entries:
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((key, shape, dtype))
        size += n
    if cur:
        shards.append(cur)
    return shards


def _header(entries) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype in entries:
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def export(ckpt: str, dst: str, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> dict:
    """Writes ``dst`` (safetensors shards + index + config.json + tokenizer files) from ``ckpt``."""
    ckpt, dst = os.fspath(ckpt), os.fspath(dst)
    record = mf.check_loadable(ckpt)
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise CheckpointError(f"{dst}: exists and is not empty; choose a new export directory")
    cfg = M1Config.from_json(os.path.join(ckpt, "config.json"))
    tgts = targets(cfg, record["dtype"])
    state_dir = os.path.join(ckpt, mf.STATE_DIR)
    meta = ow.read_metadata(state_dir)
    arrays = {p: ow.open_array(state_dir, t.name, meta) for p, t in tgts.items()}
    placements = {}
    entries = []
    for key, pl in key_table.canonical_keys(cfg):
        arr = arrays[pl.path]
        if tuple(arr.shape) != tgts[pl.path].shape:
            raise CheckpointError(f"{state_dir}/{tgts[pl.path].name}: shape {list(arr.shape)}, config.json "
                                  f"gives {list(tgts[pl.path].shape)}")
        placements[key] = pl
        entries.append((key, pl.hf_shape, np.dtype(arr.dtype.numpy_dtype)))
    order = {k: i for i, (k, _, _) in enumerate(entries)}
    entries.sort(key=lambda e: (_layer_of(e[0]), order[e[0]]))
    shards = _shards(entries, max_shard_bytes)
    n = len(shards)
    os.makedirs(dst, exist_ok=True)
    weight_map, total = {}, sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, s, d in entries)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="export", disable=not progress,
               dynamic_ncols=True)
    try:
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp = os.path.join(dst, name + ".partial")
            with open(tmp, "wb") as f:
                f.write(_header(shard))
                for key, shape, dtype in shard:
                    pl = placements[key]
                    value = arrays[pl.path][pl.slot].read().result()
                    out = contiguous_into(key_table.to_checkpoint_layout(pl, value))
                    if out.shape != tuple(shape) or out.dtype != dtype:
                        raise CheckpointError(f"{key}: exported as {out.dtype}{list(out.shape)}, expected "
                                              f"{dtype}{list(shape)}")
                    f.write(out.reshape(-1).view(np.uint8).data)
                    weight_map[key] = name
                    bar.update(out.nbytes)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(dst, name))
    finally:
        bar.close()
    for fname in ("config.json",) + TOKENIZER_FILES:
        if os.path.isfile(os.path.join(ckpt, fname)):
            shutil.copyfile(os.path.join(ckpt, fname), os.path.join(dst, fname))
    mf.write_json_atomic(os.path.join(dst, INDEX_NAME),
                         {"metadata": {"total_size": total}, "weight_map": weight_map})
    return {"tensors": len(entries), "bytes": total, "shards": n, "dst": dst}
