"""The converted checkpoint's layout, shared by ``m1 convert``, its ``--verify`` and ``m1 export``.

One :class:`Target` per model parameter (Orbax name, stacked shape, dtype, chunking), the plan of a
source checkpoint onto them, the conversion of one source tensor into its slot one output chunk at a
time, and the files copied beside the arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from m1_jax.checkpoint_io import keys as key_table
from m1_jax.checkpoint_io import orbax_layout as ow
from m1_jax.checkpoint_io.plan import plan_checkpoint, stack_dims
from m1_jax.config import M1Config
from m1_jax.convert.transpose import contiguous_into

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


@dataclass(frozen=True)
class Target:
    """One output parameter: its Orbax name, shape, dtype, chunking and number of stacked axes."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    stack_dims: int


def targets(cfg: M1Config, param_dtype) -> dict[tuple, Target]:
    """Flat NNX path -> :class:`Target`, for every parameter of the model (:func:`keys.param_layout`)."""
    stack = stack_dims(cfg)
    out = {}
    for path, (shape, fp32) in key_table.param_layout(cfg).items():
        dtype = np.dtype(np.float32) if fp32 else np.dtype(param_dtype)
        n = stack.get(path, 0)
        out[path] = Target(ow.param_name(path), shape, dtype, ow.chunk_shape(shape, n, dtype.itemsize), n)
    return out


def plan_all(cfg: M1Config, src, tgts: dict[tuple, Target]) -> list[tuple[str, list]]:
    """``[(key, placements)]`` in file order, after checking every key, shape and slot from headers alone."""
    return plan_checkpoint(cfg, src, {p: t.shape for p, t in tgts.items()})


def slot_pieces(pl, x: np.ndarray, t: Target, out_for=None):
    """``(region index, value)`` pieces of tensor ``x`` placed by ``pl``, one per output chunk.

    Each value is converted (layout, dtype) from a slice of ``x``; the whole slot never exists at once.
    A piece that needs a copy (a transposed slice) is written into ``out_for(shape, dtype)`` when given
    (a reused buffer: the caller finishes with each piece before asking for the next).
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
        view = y[a * unit:b * unit]
        out = None if view.flags.c_contiguous or out_for is None else out_for(view.shape, view.dtype)
        piece = contiguous_into(view, out).reshape((b - a,) + shape[1:])
        yield pl.slot + (slice(a, b),), piece.astype(t.dtype, copy=False)
