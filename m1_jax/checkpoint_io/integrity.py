"""Checking a converted directory's arrays against what its conversion recorded, so that damage after the
conversion (a lost, cut or changed file) is found and named instead of read as zeros or noise.

* Every load and export, cheaply (:func:`check_chunk_files`): every chunk file of every array is there,
  at its size (an uncompressed zarr chunk is always the whole chunk), and ``_METADATA`` reads.
* Every export, and a load with ``verify=True``: the CRC-32C of each region a source tensor was written
  to equals the one the manifest recorded (:func:`recorded_regions`); the export checks the regions as
  it streams them (:class:`ChecksumTracker`), a load reads them once more (:func:`check_checksums`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from m1_jax.checkpoint_io import files
from m1_jax.checkpoint_io import keys as key_table
from m1_jax.checkpoint_io import manifest as mf
from m1_jax.checkpoint_io import orbax_layout as ow
from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.checkpoint_io.plan import stack_dims
from m1_jax.config import M1Config
from m1_jax.quant.layout import stored_arrays
from m1_jax.quant.spec import QuantConfig, scale_path

DAMAGED = "the checkpoint is damaged: convert the source again"


@dataclass(frozen=True)
class Region:
    """What one placement of a source tensor filled: ``slot`` of parameter ``path`` (a whole slot, or
    several when the source stacks them), and the CRC-32C of its bytes in C order."""

    key: str
    path: tuple
    slot: tuple[int, ...]
    crc: int


def param_names(cfg: M1Config, quantize: QuantConfig | None = None) -> dict[tuple, str]:
    """Flat parameter path -> the Orbax name of its array in a converted directory (with ``quantize``, the
    one ``m1 convert --quantize`` wrote: the scales' arrays too, :mod:`m1_jax.quant`)."""
    return {p: ow.param_name(p) for p in stored_arrays(cfg, np.float32, quantize)}


def check_chunk_files(state_dir: str, names: dict[tuple, str], meta: dict) -> None:
    """Every chunk file of every array in the converted Orbax checkpoint ``state_dir`` is present at its
    size; the first that is not is named. ``meta``: its ``_METADATA`` (:func:`m1_jax.checkpoint_io.orbax_layout.read_metadata`).
    Checkpoints in Orbax's own storage (OCDBT, zarr3) are left to the checksums."""
    if meta.get("use_ocdbt") or meta.get("use_zarr3"):
        return
    for name in names.values():
        array_dir = os.path.join(state_dir, name)
        try:
            zarray = files.read_json(os.path.join(array_dir, ".zarray"))
        except FileNotFoundError:
            raise CheckpointError(f"{array_dir}: missing (the array of parameter {name}); {DAMAGED}") from None
        shape, chunks = zarray["shape"], zarray["chunks"]
        sep = zarray.get("dimension_separator") or "."
        itemsize = 2 if zarray["dtype"] == "bfloat16" else np.dtype(zarray["dtype"]).itemsize
        size = int(np.prod(chunks, dtype=np.int64)) * itemsize if zarray.get("compressor") is None else None
        present = {e.name: e.stat().st_size for e in os.scandir(array_dir)}
        for coords in np.ndindex(*(-(-n // c) for n, c in zip(shape, chunks))):
            fname = sep.join(map(str, coords)) or "0"
            path = os.path.join(array_dir, fname)
            if fname not in present:
                raise CheckpointError(f"{path}: missing (a chunk of {name}); {DAMAGED}")
            if size is not None and present[fname] != size:
                raise CheckpointError(f"{path}: {present[fname]} bytes, a chunk of {name} has {size}: "
                                      f"truncated; {DAMAGED}")


def recorded_regions(ckpt_dir: str, cfg: M1Config) -> dict[tuple, Region]:
    """``{(path, slot): Region}`` from the manifest of the converted directory ``ckpt_dir``; every slot of
    every parameter must be recorded (a manifest missing one is named with the slot)."""
    manifest_file = os.path.join(ckpt_dir, mf.MANIFEST_FILE)
    layout = key_table.param_layout(cfg)
    covered = {p: np.zeros(layout[p][0][:n], bool) for p, n in stack_dims(cfg).items()}
    regions: dict[tuple, Region] = {}
    for key, crcs in mf.read_manifest(ckpt_dir).items():
        try:
            placements = key_table.plan(cfg, key) or []
        except key_table.UnknownKeyError as e:
            raise CheckpointError(f"{manifest_file}: records {e}") from None
        if len(placements) != len(crcs):
            raise CheckpointError(f"{manifest_file}: '{key}' has {len(crcs)} checksums, its placements "
                                  f"{len(placements)}; the file is damaged")
        for pl, crc in zip(placements, crcs):
            regions[(pl.path, pl.slot)] = Region(key, pl.path, pl.slot, crc)
            covered[pl.path][pl.slot] = True
    for path, done in covered.items():
        if not done.all():
            slot = [int(i) for i in np.argwhere(~done)[0]]
            raise CheckpointError(f"{manifest_file}: records no tensor written to {'.'.join(map(str, path))}"
                                  f"{slot}; the conversion did not finish: convert the source again")
    return regions


def _mismatch(state_dir: str, name: str, r: Region, got: int) -> CheckpointError:
    return CheckpointError(f"{state_dir}/{name}{list(r.slot)} ('{r.key}'): checksum {got:08x}, the conversion "
                           f"recorded {r.crc:08x}; {DAMAGED}")


class ChecksumTracker:
    """Checks the recorded regions (:func:`recorded_regions`) against slots fed one at a time.

    :meth:`add` takes each stacked slot's value as read; a region spanning several slots (a source
    tensor holding all experts of a layer) must receive them in C order (the export's order: layer by
    layer, experts ascending). A region's checksum is compared as soon as its last slot arrives."""

    def __init__(self, regions: dict[tuple, Region], cfg: M1Config, state_dir: str, names: dict[tuple, str]):
        self.regions, self.state_dir, self.names = regions, state_dir, names
        self.stack, self.layout = stack_dims(cfg), key_table.param_layout(cfg)
        self.crc: dict[tuple, int] = {}
        self.fed: dict[tuple, int] = {}

    def add(self, path: tuple, slot: tuple[int, ...], value: np.ndarray) -> None:
        k = next((k for k in range(len(slot), -1, -1) if (path, slot[:k]) in self.regions), None)
        if k is None:
            raise CheckpointError(f"{self.state_dir}/{self.names[path]}{list(slot)}: not in any recorded region")
        r = self.regions[(path, slot[:k])]
        grid = self.layout[path][0][k:len(slot)]  # the slots of the region
        index = int(np.ravel_multi_index(slot[k:], grid)) if grid else 0
        fed = self.fed.get((path, r.slot), 0)
        if index != fed:
            raise RuntimeError(f"{self.names[path]}{list(slot)}: fed out of order ({index} after {fed})")
        crc = mf.checksum(value, self.crc.get((path, r.slot), 0))
        self.crc[(path, r.slot)], self.fed[(path, r.slot)] = crc, fed + 1
        if fed + 1 == int(np.prod(grid, dtype=np.int64)) and crc != r.crc:
            raise _mismatch(self.state_dir, self.names[path], r, crc)

    def finish(self) -> None:
        """Every recorded region was fed whole."""
        left = [r for key, r in self.regions.items() if key not in self.fed]
        if left:
            raise RuntimeError(f"{len(left)} recorded regions were not checked, e.g. {left[0]}")


def region_checksum(array, slot: tuple[int, ...], max_bytes: int = ow.CHUNK_BYTES, crc: int = 0) -> int:
    """CRC-32C of ``array[slot]`` (a TensorStore array) in C order, read at most ``max_bytes`` at a time,
    continuing ``crc``."""
    shape = tuple(array.shape)[len(slot):]
    if not shape:
        return mf.checksum(array[slot].read().result(), crc)
    row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(array.dtype.numpy_dtype).itemsize
    step = max(1, max_bytes // max(row, 1))
    for a in range(0, shape[0], step):
        crc = mf.checksum(array[slot + (slice(a, min(a + step, shape[0])),)].read().result(), crc)
    return crc


def check_checksums(ckpt_dir: str, cfg: M1Config, meta: dict | None = None, *, progress: bool = False) -> int:
    """Reads every recorded region of the converted directory ``ckpt_dir`` back and compares its
    checksum with the record; returns the number of regions checked. An int8 weight's region is its values
    and then its scales (what ``m1 convert --quantize`` recorded)."""
    state_dir = os.path.join(ckpt_dir, mf.STATE_DIR)
    meta = ow.read_metadata(state_dir) if meta is None else meta
    names = param_names(cfg, QuantConfig.from_dict((mf.read_record(ckpt_dir) or {}).get("quantize")))
    regions = recorded_regions(ckpt_dir, cfg)
    arrays = {p: ow.open_array(state_dir, n, meta) for p, n in names.items()}
    for r in tqdm(regions.values(), desc="verify", unit="tensor", disable=not progress):
        got = region_checksum(arrays[r.path], r.slot)
        if scale_path(r.path) in arrays:
            got = region_checksum(arrays[scale_path(r.path)], r.slot, crc=got)
        if got != r.crc:
            raise _mismatch(state_dir, names[r.path], r, got)
    return len(regions)
