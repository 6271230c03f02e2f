"""Planning a checkpoint read from its headers alone: where every tensor goes, checked before any data moves.

Shared by :func:`m1_jax.from_pretrained` and ``m1 convert``: every key must be known (derived buffers
are skipped), have the shape the config gives, and fill slots of the stacked parameters that no other
key fills; every slot must be filled.
"""

from __future__ import annotations

import numpy as np

from m1_jax.checkpoint_io import keys as key_table
from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.config import M1Config


def stack_dims(cfg: M1Config) -> dict[tuple, int]:
    """Parameter path -> number of leading stacked axes (0 global, 1 per period, 2 per period and expert)."""
    out: dict[tuple, int] = {}
    for _, pl in key_table.canonical_keys(cfg):
        out[pl.path] = max(out.get(pl.path, 0), len(pl.slot))
    return out


def plan_checkpoint(cfg: M1Config, src, shapes: dict[tuple, tuple[int, ...]]) -> list[tuple[str, list]]:
    """``[(key, placements)]`` in file order for reader ``src`` (``keys()``, ``info(key)`` with ``file``,
    ``shape``, ``start``; ``path``) onto parameters of the given shapes; raises :class:`CheckpointError`
    naming the file and key for the first problem."""
    owner = {p: np.full(shapes[p][:n], -1, np.int64) for p, n in stack_dims(cfg).items() if p in shapes}
    jobs: list[tuple[str, list]] = []
    for key in src.keys():
        info = src.info(key)
        try:
            placements = key_table.plan(cfg, key)
        except key_table.UnknownKeyError as e:
            raise CheckpointError(f"{info.file}: unknown key {e}") from None
        if placements is None:
            continue
        if tuple(info.shape) != placements[0].hf_shape:
            raise CheckpointError(f"{info.file}: '{key}' has shape {list(info.shape)}, but config.json gives "
                                  f"{list(placements[0].hf_shape)}")
        for pl in placements:
            if pl.path not in owner:
                raise CheckpointError(f"{info.file}: '{key}' maps to {pl.path}, which the model does not have")
            taken = owner[pl.path][pl.slot]
            taken = taken[taken >= 0] if isinstance(taken, np.ndarray) else [taken] if taken >= 0 else []
            if len(taken):
                raise CheckpointError(f"{info.file}: '{key}' fills a slot of {'.'.join(map(str, pl.path))} "
                                      f"already filled by '{jobs[int(taken[0])][0]}'")
            owner[pl.path][pl.slot] = len(jobs)
        jobs.append((key, placements))
    missing = [k for k, pl in key_table.canonical_keys(cfg) if (owner[pl.path][pl.slot] < 0).any()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{src.path}: missing weights: {', '.join(missing[:5])}{more}")
    order = {k: (src.info(k).file, src.info(k).start) for k, _ in jobs}
    jobs.sort(key=lambda j: order[j[0]])
    return jobs
