"""Opening a source checkpoint directory with the lazy reader its files call for."""

from __future__ import annotations

import os

from m1_jax.checkpoint_io import safetensors_io, torch_bin
from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.checkpoint_io.safetensors_io import LazyCheckpoint, SafetensorsCheckpoint


def open_source(path: str, direct: bool = False) -> LazyCheckpoint:
    """The lazy reader for a checkpoint directory: safetensors if present, else PyTorch ``.bin`` files.

    ``direct``: safetensors reads into page-aligned buffers bypass the page cache (what a conversion wants).
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    names = os.listdir(path)
    if safetensors_io.INDEX_NAME in names or any(n.endswith(".safetensors") for n in names):
        return SafetensorsCheckpoint(path, direct=direct)
    if torch_bin.has_torch_files(path):
        return torch_bin.TorchCheckpoint(path)
    raise CheckpointError(f"{path}: no *.safetensors or PyTorch *.bin files")
