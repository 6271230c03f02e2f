"""Training checkpoints: Orbax ``CheckpointManager`` over ``WORKDIR/checkpoints``.

Each step directory holds three items, committed together and atomically (Orbax writes to a
temporary directory and renames it when every item and every host is done, so a run killed mid-save
leaves the previous checkpoint as the latest):

* ``state``: the train state (parameters, optimizer moments, optimizer step) as the pure-dict pytree of
  ``nnx.state((model, optimizer))``; restored straight into the shardings of the current mesh, which
  may differ from the mesh that saved it (Orbax reads each device's shards);
* ``data``: the data iterator state of every shard (gathered from all processes);
* ``meta``: step, model config (HF config.json format) and run config.

Saves are asynchronous by default: :meth:`Checkpointer.save` returns once the arrays are copied off the
devices and training continues while they are written.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np

from m1_jax.checkpoint_io.errors import CheckpointError

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "meta")


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, save_every: int = 100, max_to_keep: int | None = 2,
                 async_save: bool = True):
        ocp = _ocp()
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(save_interval_steps=max(save_every, 1), max_to_keep=max_to_keep,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    # ------------------------------------------------------------------ save
    def save(self, step: int, state, data_state: dict | None, meta: dict, *, force: bool = False) -> bool:
        """Saves when ``step`` is due (every ``save_every`` steps) or ``force``; returns whether it did."""
        ocp = _ocp()
        from flax import nnx

        if not force and not self.manager.should_save(step):
            return False
        data_state = gather_data_state(data_state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
                                  data=ocp.args.JsonSave(data_state or {}),
                                  meta=ocp.args.JsonSave(dict(meta, step=int(step))))
        return self.manager.save(step, args=args, force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    # ------------------------------------------------------------------ restore
    def latest_step(self) -> int | None:
        self.manager.reload()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return list(self.manager.all_steps())

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, dict, int]:
        """-> (train state with ``abstract_state``'s shardings, data state, meta, step).

        ``abstract_state``: ``nnx.State`` of ``jax.ShapeDtypeStruct`` leaves carrying the target
        shardings (:meth:`m1_jax.train.TrainState.abstract_state`)."""
        ocp = _ocp()
        from flax import nnx

        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
        target = nnx.to_pure_dict(abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore the train state into this model and "
                                  f"optimizer ({type(e).__name__}: {str(e)[:400]})") from None
        state = jax.tree.map(lambda x: x, abstract_state)  # a copy to fill
        nnx.replace_by_pure_dict(state, restored.state)
        return state, dict(restored.data or {}), dict(restored.meta or {}), step


def gather_data_state(state: dict | None) -> dict | None:
    """Merges the data iterator states of all processes (each owns some shards) on every process."""
    if state is None or jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int64)).reshape(-1)
    buf = np.zeros((int(sizes.max()),), np.uint8)
    buf[: raw.size] = raw
    every = multihost_utils.process_allgather(buf).reshape(len(sizes), -1)
    merged = {"shards": state["shards"], "iterators": {}}
    for row, n in zip(every, sizes):
        merged["iterators"].update(json.loads(bytes(row[: int(n)]).decode())["iterators"])
    return merged
