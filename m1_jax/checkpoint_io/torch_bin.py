"""Lazy reading of PyTorch ``.bin`` checkpoints (the ``[torch]`` extra), one tensor at a time.

Each file is opened with ``torch.load(weights_only=True, mmap=True)``: tensors stay memory-mapped
until read, so no file is loaded whole. A directory holds ``pytorch_model.bin``, or shards listed by
``pytorch_model.bin.index.json``, or (without an index) every ``*.bin`` file in it. Same interface as
:class:`m1_jax.checkpoint_io.safetensors_io.SafetensorsCheckpoint`.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np

from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.checkpoint_io.safetensors_io import LazyCheckpoint, TensorInfo, read_weight_map

INDEX_NAME = "pytorch_model.bin.index.json"
SINGLE_NAME = "pytorch_model.bin"


def has_torch_files(path: str) -> bool:
    return os.path.isdir(path) and any(f.endswith(".bin") for f in os.listdir(path))


def _import_torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading PyTorch .bin checkpoints needs torch: pip install 'm1-jax[torch]'") from None
    return torch


class TorchCheckpoint(LazyCheckpoint):
    """All tensors of a directory of PyTorch ``.bin`` files, memory-mapped and read lazily."""

    def __init__(self, path: str | os.PathLike):
        torch = _import_torch()
        self._torch = torch
        path = os.fspath(path)
        self.path = path
        index = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index):
            weight_map = read_weight_map(index)
            files = sorted(set(weight_map.values()))
        else:
            single = os.path.join(path, SINGLE_NAME)
            files = [SINGLE_NAME] if os.path.isfile(single) else sorted(
                f for f in os.listdir(path) if f.endswith(".bin"))
            weight_map = None
        if not files:
            raise CheckpointError(f"{path}: no {SINGLE_NAME}, {INDEX_NAME} or *.bin files")
        self._files: dict[str, dict] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise CheckpointError(f"{file}: shard file is missing")
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError on a bad file
                raise CheckpointError(f"{file}: cannot read PyTorch checkpoint (truncated or corrupt?): "
                                      f"{type(e).__name__}: {e}") from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{file}: holds a {type(sd).__name__}, not a state dict")
            self._files[file] = sd
            for key, t in sd.items():
                if weight_map is not None and weight_map.get(key) != name:
                    continue
                if key in self.tensors:
                    raise CheckpointError(f"{file}: tensor '{key}' also appears in {self.tensors[key].file}")
                self.tensors[key] = TensorInfo(file, self._np_dtype(t.dtype), tuple(t.shape), -1,
                                               t.numel() * t.element_size())
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in self.tensors:
                    raise CheckpointError(f"{index}: names tensor '{key}' in {name}, which does not hold it")

    def _np_dtype(self, dtype) -> np.dtype:
        if dtype == self._torch.bfloat16:
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self._torch.empty((), dtype=dtype).numpy().dtype)

    def read(self, key: str) -> np.ndarray:
        """One tensor as stored (dtype and shape), copied out of the memory map."""
        info = self.tensors[key]
        return self.read_into(key, np.empty(info.nbytes, np.uint8))

    def read_into(self, key: str, buf: np.ndarray) -> np.ndarray:
        info = self.tensors[key]
        out = buf.reshape(-1).view(np.uint8)[: info.nbytes]
        if len(out) < info.nbytes:
            raise ValueError(f"read_into: buffer of {len(out)} bytes for '{key}' of {info.nbytes}")
        t = self._files[info.file][key]
        try:
            t = t.contiguous()
            if t.dtype == self._torch.bfloat16:
                t = t.view(self._torch.int16)
            np.copyto(out.view(t.numpy().dtype), t.numpy().reshape(-1))
        except RuntimeError as e:  # a short file surfaces here when the map is touched
            raise CheckpointError(f"{info.file}: truncated while reading '{key}': {e}") from None
        return out.view(info.dtype).reshape(info.shape)
