"""What a checkpoint path the user gives holds, told from its files alone (no JAX, no weights read).

Three kinds of directory hold a model:

* ``huggingface``: ``config.json`` + safetensors shards (or PyTorch ``.bin`` files);
* ``converted``: an ``m1 convert`` output (:mod:`m1_jax.checkpoint_io.manifest`);
* ``training``: a checkpoint that ``m1 train`` saved. The path may be the run's workdir (its latest
  step), its ``checkpoints`` directory (the same), or one step directory ``WORKDIR/checkpoints/N``. A
  step holds the Orbax items of :mod:`m1_jax.checkpoint`: ``state`` (the pure-dict state of
  ``(model, optimizer)``: the model's parameters under :data:`MODEL_ITEM`), ``data`` and ``meta``
  (the model config in config.json form and the run config).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from m1_jax.checkpoint_io import files
from m1_jax.checkpoint_io import manifest as mf
from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.config import M1Config

HUGGINGFACE, CONVERTED, TRAINING = "huggingface", "converted", "training"
STEPS_DIR = "checkpoints"  # of a training workdir
STATE_ITEM, META_ITEM = "state", "meta"  # items of a step directory
META_FILE = "metadata"  # the JSON file of the meta item
MODEL_ITEM = "0"  # the model's subtree of the (model, optimizer) train state
BYTE_TOKENIZER = "byte"  # data.tokenizer of a run trained on byte-level tokens


@dataclass(frozen=True)
class Checkpoint:
    """A located checkpoint. ``directory``: the directory holding it (the step directory of a training
    checkpoint); ``step`` and ``meta`` only for training checkpoints."""

    kind: str
    path: str
    directory: str
    step: int | None = None
    meta: dict | None = None

    @property
    def meta_file(self) -> str:
        return os.path.join(self.directory, META_ITEM, META_FILE)

    @property
    def state_dir(self) -> str:
        """The Orbax checkpoint of the parameters (converted and training checkpoints)."""
        return os.path.join(self.directory, STATE_ITEM if self.kind == TRAINING else mf.STATE_DIR)

    def config(self) -> M1Config:
        if self.kind != TRAINING:
            return M1Config.from_json(os.path.join(self.directory, "config.json"))
        return M1Config.from_dict(self.meta.get("config") or {}, source=f"{self.meta_file}: config")

    @property
    def tokenizer(self) -> str:
        """Where the tokenizer is: a directory (or tokenizer.json file) for the tokenizer loader, or
        :data:`BYTE_TOKENIZER`. A training checkpoint's is its run config's ``data.tokenizer``."""
        if self.kind != TRAINING:
            return self.directory
        spec = ((self.meta.get("run") or {}).get("data") or {}).get("tokenizer", BYTE_TOKENIZER)
        if spec == BYTE_TOKENIZER:
            return spec
        if not isinstance(spec, str) or not os.path.exists(spec):
            raise CheckpointError(f"{self.meta_file}: data.tokenizer {spec!r}: no such directory or file here "
                                  "(the run's tokenizer); pass --tokenizer")
        if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "tokenizer.json")):
            raise CheckpointError(f"{self.meta_file}: data.tokenizer {spec!r} holds no tokenizer.json; pass "
                                  "--tokenizer")
        return spec


def locate(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at ``path`` (see the module); :class:`CheckpointError` naming the path when it
    holds none."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        what = "not a directory" if os.path.exists(path) else "no such checkpoint directory"
        raise CheckpointError(f"{path}: {what}")
    if mf.is_converted(path):
        return Checkpoint(CONVERTED, path, path)
    if _is_step(path):
        return _training(path, path)
    steps_dir = os.path.join(path, STEPS_DIR)
    if os.path.isdir(steps_dir) or (os.path.basename(os.path.normpath(path)) == STEPS_DIR and _steps(path)):
        steps_dir = steps_dir if os.path.isdir(steps_dir) else path
        steps = _steps(steps_dir)
        if not steps:
            raise CheckpointError(f"{steps_dir}: no checkpoint saved yet (a training run saves every "
                                  "train.checkpoint_every steps and at its end)")
        return _training(path, os.path.join(steps_dir, str(max(steps))))
    if os.path.isfile(os.path.join(path, "config.json")) or _has_weights(path):
        return Checkpoint(HUGGINGFACE, path, path)
    raise CheckpointError(f"{path}: not a checkpoint directory: no config.json (a Hugging Face checkpoint or "
                          f"`m1 convert` output) and no {STEPS_DIR}/ (an `m1 train` workdir)")


def _is_step(path: str) -> bool:
    return os.path.isdir(os.path.join(path, STATE_ITEM)) and os.path.isdir(os.path.join(path, META_ITEM))


def _steps(steps_dir: str) -> list[int]:
    """The saved steps: directories named by their step number (Orbax writes a step under a temporary
    name and renames it when complete; a damaged step set aside is ``N.damaged``)."""
    return [int(name) for name in os.listdir(steps_dir)
            if name.isdigit() and os.path.isdir(os.path.join(steps_dir, name))]


def _has_weights(path: str) -> bool:
    return any(name.endswith((".safetensors", ".bin", ".safetensors.index.json")) for name in os.listdir(path))


def _training(path: str, step_dir: str) -> Checkpoint:
    name = os.path.basename(os.path.normpath(step_dir))
    meta_file = os.path.join(step_dir, META_ITEM, META_FILE)
    try:
        meta = files.read_json(meta_file)
    except FileNotFoundError:
        raise CheckpointError(f"{meta_file}: missing; {step_dir} is not a whole `m1 train` checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file}: expected a JSON object, got {type(meta).__name__}")
    return Checkpoint(TRAINING, path, step_dir, int(name) if name.isdigit() else None, meta)
