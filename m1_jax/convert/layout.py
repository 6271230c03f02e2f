"""The converted checkpoint's layout, shared by ``m1 convert``, its ``--verify`` and ``m1 export``.

One :class:`Target` per model parameter (Orbax name, stacked shape, dtype, chunking), the plan of a
source checkpoint onto them, the conversion of one source tensor into its slot one output chunk at a
time, and the files copied beside the arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from m1_jax.checkpoint_io import orbax_layout as ow
from m1_jax.checkpoint_io.plan import plan_checkpoint
from m1_jax.config import M1Config
from m1_jax.convert.transpose import contiguous_into
from m1_jax.quant.layout import contracted_axes, stored_arrays
from m1_jax.quant.spec import QuantConfig, quantize, scale_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


@dataclass(frozen=True)
class Target:
    """One output array: its Orbax name, shape, dtype, chunking and number of stacked axes; for an int8 weight
    (:mod:`m1_jax.quant`) the axes its matmul contracts and the path of its scales' array."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    stack_dims: int
    contracted: int | None = None
    scale: tuple | None = None


def targets(cfg: M1Config, param_dtype, quantize: QuantConfig | None = None) -> dict[tuple, Target]:
    """Flat NNX path -> :class:`Target`, for every array of the model's state
    (:func:`m1_jax.quant.layout.stored_arrays`: the parameters, and the scales of int8 weights)."""
    out = {}
    for path, (shape, dtype, n) in stored_arrays(cfg, param_dtype, quantize).items():
        c = contracted_axes(path, quantize)
        out[path] = Target(ow.param_name(path), shape, dtype, ow.chunk_shape(shape, n, dtype.itemsize), n, c,
                           None if c is None else scale_path(path))
    return out


def quantized_slots(pl, x: np.ndarray, t: Target):
    """``(slot, int8 values, float32 scales)`` of tensor ``x`` placed by ``pl`` into the int8 weight ``t``, one
    slot (one expert's or one layer's weight) at a time: each is quantized whole (its scales need every
    contracted row), so it exists once in float32 while it is converted."""
    y = pl.layout(x)
    inner = t.stack_dims - len(pl.slot)  # stacked axes inside the source tensor (all experts of a layer)
    shape = t.shape[t.stack_dims:]
    for u in np.ndindex(*t.shape[len(pl.slot):t.stack_dims]) if inner else [()]:
        q, s = quantize(np.ascontiguousarray(y[u] if u else y, dtype=np.float32).reshape(shape), 0, t.contracted)
        yield pl.slot + u, q, s


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
