"""``m1 convert``: a Hugging Face / PyTorch checkpoint directory -> an Orbax checkpoint the model restores.

The output is the model's own NNX state layout (``nnx.state(abstract_model(cfg))``: stacked periods,
stacked experts, Flax ``[in, out]``) written as an Orbax PyTree checkpoint under ``DST/state``, with
``config.json``, the tokenizer files and the records of :mod:`m1_jax.convert.manifest`.

Streaming: every source tensor is checked against the config from the headers alone before anything
is written; then tensors are read one at a time (in file order) through the key table
(:func:`m1_jax.convert.keys.plan`), and each slot is written region by region, one chunk-sized piece
at a time (:mod:`m1_jax.convert.orbax_writer`). Peak host memory is about one source tensor plus a
few pieces, whatever the depth.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from m1_jax.config import M1Config
from m1_jax.convert import keys as key_table
from m1_jax.convert import manifest as mf
from m1_jax.convert import orbax_writer as ow
from m1_jax.convert.safetensors_io import CheckpointError, SafetensorsCheckpoint
from m1_jax.convert.plan import plan_checkpoint, stack_dims

log = logging.getLogger(__name__)

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
MAX_IN_FLIGHT = 2  # pieces being written while the next one is prepared


def open_source(path: str):
    """The lazy reader for a checkpoint directory: safetensors if present, else PyTorch ``.bin`` files."""
    from m1_jax.convert import safetensors_io, torch_bin

    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    names = os.listdir(path)
    if safetensors_io.INDEX_NAME in names or any(n.endswith(".safetensors") for n in names):
        return SafetensorsCheckpoint(path)
    if torch_bin.has_torch_files(path):
        return torch_bin.TorchCheckpoint(path)
    raise CheckpointError(f"{path}: no *.safetensors or PyTorch *.bin files")


@dataclass(frozen=True)
class Target:
    """One output parameter: its Orbax name, shape, dtype, chunking and number of stacked axes."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    stack_dims: int


def targets(cfg: M1Config, state) -> dict[tuple, Target]:
    """Flat NNX path -> :class:`Target`, for every leaf of the abstract model state."""
    from flax import nnx

    stack = stack_dims(cfg)
    by_str = {tuple(map(str, p)): p for p, _ in nnx.to_flat_state(state)}
    out = {}
    for names, name, _, leaf in ow.tree_leaves(state):
        key = names[:-1] if names[-1] == "value" and names[:-1] in by_str else names
        path = by_str[key]
        dtype = np.dtype(leaf.dtype)
        n = stack.get(path, 0)
        out[path] = Target(name, tuple(leaf.shape), dtype, ow.chunk_shape(leaf.shape, n, dtype.itemsize), n)
    return out


def plan_all(cfg: M1Config, src, tgts: dict[tuple, Target]) -> list[tuple[str, list]]:
    """``[(key, placements)]`` in file order, after checking every key, shape and slot from headers alone."""
    return plan_checkpoint(cfg, src, {p: t.shape for p, t in tgts.items()})


def _contiguous(view: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of a strided view (a transposed slice); torch's tiled copy when installed."""
    if view.flags.c_contiguous:
        return view
    if view.ndim == 2 and view.dtype.itemsize in _INT_OF_SIZE:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:  # tiled: faster than numpy's strided copy for a transpose
            ints = view.view(_INT_OF_SIZE[view.dtype.itemsize])
            with warnings.catch_warnings():  # read-only source buffer: torch only reads it here
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(ints).contiguous().numpy().view(view.dtype)
    return np.ascontiguousarray(view)


_INT_OF_SIZE = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def slot_pieces(pl, x: np.ndarray, t: Target):
    """``(region index, value)`` pieces of tensor ``x`` placed by ``pl``, one per output chunk.

    Each value is converted (layout, dtype) from a slice of ``x``; the whole slot never exists at once.
    """
    y = pl.layout(x)  # a view: transposes and halves do not copy
    axis = len(pl.slot)
    shape = t.shape[axis:]
    if not shape:
        yield pl.slot, np.asarray(y, dtype=t.dtype).reshape(())
        return
    if y.shape[0] == shape[0]:
        unit = 1
    elif len(shape) > 1 and y.ndim >= 1 and y.shape[0] == shape[0] * shape[1]:
        unit = shape[1]
    else:  # no row correspondence: convert the slot whole
        y, unit = np.ascontiguousarray(y).reshape(shape), 1
    step = t.chunks[axis]
    for a in range(0, shape[0], step):
        b = min(a + step, shape[0])
        piece = _contiguous(y[a * unit:b * unit]).reshape((b - a,) + shape[1:])
        yield pl.slot + (slice(a, b),), piece.astype(t.dtype, copy=False)


def write_tensor(arrays, tgts, key: str, placements, x: np.ndarray) -> list[int]:
    """Writes one source tensor into its slots; returns the CRC-32 of each placement's written bytes.

    A piece that is exactly one chunk (a whole slot row range) is written as the chunk file itself;
    any other region goes through a TensorStore write.
    """
    crcs, pending = [], []
    for pl in placements:
        t, crc = tgts[pl.path], 0
        arr = arrays[pl.path]
        for index, piece in slot_pieces(pl, x, t):
            crc = mf.crc32(piece, crc)
            if len(pl.slot) == t.stack_dims and len(t.shape) > t.stack_dims:  # piece == one chunk
                coords = pl.slot + (index[-1].start // t.chunks[t.stack_dims],) + (0,) * (len(t.shape) - t.stack_dims - 1)
                ow.write_chunk(arr.kvstore.path, coords, piece.reshape((1,) * t.stack_dims + piece.shape), t.chunks)
                continue
            pending.append(arr[index].write(piece))
            if len(pending) >= MAX_IN_FLIGHT:
                pending.pop(0).result()
        crcs.append(crc)
    for fut in pending:
        fut.result()
    return crcs


def resolve_dtype(name: str, cfg: M1Config, src) -> str:
    if name in DTYPES:
        return DTYPES[name]
    if name != "keep":
        raise CheckpointError(f"--dtype {name}: expected bf16, fp32 or keep")
    for key in src.keys():
        if key.endswith("embed_tokens.weight"):
            pls = key_table.plan(cfg, key)
            if pls and pls[0].path == ("embed_tokens",):
                return np.dtype(src.info(key).dtype).name
    return "float32"


def prepare_destination(dst: str, record: dict, resume: bool) -> None:
    """Refuses a DST holding something else (another model, other options, unrelated files)."""
    if not os.path.exists(dst):
        os.makedirs(dst)
        return
    if not os.path.isdir(dst):
        raise CheckpointError(f"{dst}: exists and is not a directory")
    old = mf.read_record(dst)
    if old is None:
        if os.listdir(dst):
            raise CheckpointError(f"{dst}: not empty and not a conversion output; choose an empty or new DST")
        return
    diff = mf.differences(old, record)
    if diff:
        what = "a complete conversion" if mf.is_complete(dst) else "a partial conversion"
        raise CheckpointError(f"{dst}: holds {what} of another model or with other options "
                              f"({'; '.join(diff)}); delete it or choose another DST")
    if mf.is_complete(dst):
        raise CheckpointError(f"{dst}: already holds this complete conversion; delete it to convert again")
    if not resume:
        raise CheckpointError(f"{dst}: holds an unfinished conversion of this source; pass --resume to finish "
                              "it, or delete it")


def convert(src_path: str, dst: str, *, dtype: str = "keep", resume: bool = False, verify: bool = False,
            mesh=None, progress: bool = True) -> dict:
    """Converts ``src_path`` to ``dst``; returns a summary (tensors, bytes, dtype, verification)."""
    from flax import nnx

    from m1_jax.model import abstract_model

    src_path, dst = os.fspath(src_path), os.fspath(dst)
    cfg = M1Config.from_json(os.path.join(src_path, "config.json"))
    src = open_source(src_path)
    dtype_name = resolve_dtype(dtype, cfg, src)
    state = nnx.state(abstract_model(cfg, param_dtype=np.dtype(dtype_name)))
    tgts = targets(cfg, state)
    jobs = plan_all(cfg, src, tgts)  # every bad input fails here, before DST is touched
    record = mf.make_record(cfg, src, src_path, dtype_name)
    prepare_destination(dst, record, resume)
    mf.write_json_atomic(os.path.join(dst, mf.RECORD_FILE), record)
    shutil.copyfile(os.path.join(src_path, "config.json"), os.path.join(dst, "config.json"))
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src_path, name)):
            shutil.copyfile(os.path.join(src_path, name), os.path.join(dst, name))

    state_dir = os.path.join(dst, mf.STATE_DIR)
    os.makedirs(state_dir, exist_ok=True)
    arrays = {p: ow.create_array(state_dir, t.name, t.shape, t.dtype, t.chunks) for p, t in tgts.items()}
    for t in tgts.values():  # chunk files a kill cut short (never under a chunk's own name)
        for entry in os.scandir(os.path.join(state_dir, t.name)):
            if entry.name.endswith(".partial"):
                os.remove(entry.path)
    manifest = mf.Manifest(dst)
    sizes = {k: src.info(k).nbytes for k, _ in jobs}
    done_bytes = sum(sizes[k] for k, _ in jobs if k in manifest.done)
    bar = tqdm(total=sum(sizes.values()), initial=done_bytes, unit="B", unit_scale=True, unit_divisor=1024,
               desc="convert", disable=not progress, dynamic_ncols=True)
    n_done = sum(1 for k, _ in jobs if k in manifest.done)
    try:
        for key, placements in jobs:
            if key in manifest.done:
                continue
            crcs = write_tensor(arrays, tgts, key, placements, src.read(key))
            manifest.add(key, crcs)
            n_done += 1
            bar.update(sizes[key])
            bar.set_postfix_str(f"{n_done}/{len(jobs)} tensors", refresh=False)
    finally:
        bar.close()
        manifest.close()
    ow.write_metadata(state_dir, ow.tree_leaves(state))
    summary = {"tensors": len(jobs), "bytes": sum(sizes.values()), "dtype": dtype_name, "dst": dst}
    if verify:
        from m1_jax.convert.verify import verify_conversion

        summary["verify"] = verify_conversion(src_path, dst, mesh=mesh, progress=progress)
    mf.sync_filesystem(state_dir)
    with open(os.path.join(dst, mf.COMPLETE_FILE), "w") as f:
        f.write("conversion complete\n")
        f.flush()
        os.fsync(f.fileno())
    return summary
