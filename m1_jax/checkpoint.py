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

A step that cannot be read back (a file truncated or overwritten after the save) is *damaged*:
:meth:`Checkpointer.restore_newest` then falls back to the newest step that restores, logs which steps
were damaged and why, and sets them aside as ``STEP.damaged`` (kept for inspection, ignored by Orbax).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np

from m1_jax.checkpoint_io.errors import CheckpointError, cause_line, ignore_abandoned_reads

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "meta")


class DamagedCheckpointError(CheckpointError):
    """A step whose files do not read back; the message names the step's item directory and the cause."""


@dataclass
class Restored:
    state: Any  # the train state, with the target shardings
    data: dict  # the data iterator state
    meta: dict  # step, model config, run config
    step: int
    damaged: dict[int, str] = field(default_factory=dict)  # newer steps that did not restore -> why


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

    def restore(self, abstract_state, step: int | None = None, *,
                check_meta: Callable[[dict, str], None] | None = None) -> tuple[Any, dict, dict, int]:
        """-> (train state with ``abstract_state``'s shardings, data state, meta, step) of ``step``
        (default: the latest).

        ``abstract_state``: ``nnx.State`` of ``jax.ShapeDtypeStruct`` leaves carrying the target
        shardings (:meth:`m1_jax.train.TrainState.abstract_state`). ``check_meta(meta, step_dir)``, when
        given, runs on the step's meta before anything else is read and raises to refuse it. Raises
        :class:`DamagedCheckpointError` when an item of the step does not read back."""
        ocp = _ocp()
        from flax import nnx

        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
        meta = dict(self._read(step, "meta", ocp.args.JsonRestore()) or {})
        if check_meta is not None:
            check_meta(meta, f"{self.directory}/{step}")
        data = dict(self._read(step, "data", ocp.args.JsonRestore()) or {})
        restored = self._read(step, "state", ocp.args.StandardRestore(nnx.to_pure_dict(abstract_state)))
        state = jax.tree.map(lambda x: x, abstract_state)  # a copy to fill
        try:
            nnx.replace_by_pure_dict(state, restored)
        except (ValueError, KeyError) as e:
            raise DamagedCheckpointError(f"{self.directory}/{step}/state: does not hold this model and optimizer "
                                         f"({cause_line(e)})") from None
        return state, data, meta, step

    def _read(self, step: int, item: str, args):
        ocp = _ocp()
        try:
            return getattr(self.manager.restore(step, args=ocp.args.Composite(**{item: args})), item)
        except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many kinds: the item does not read
            what = "cannot be restored into this model and optimizer" if item == "state" else "unreadable"
            raise DamagedCheckpointError(f"{self.directory}/{step}/{item}: {what} ({cause_line(e)})") from None

    def restore_newest(self, abstract_state, *, check_meta: Callable[[dict, str], None] | None = None) -> Restored:
        """Restores the newest step that reads back on every process (see :meth:`restore`). Newer damaged
        steps are logged and set aside as ``STEP.damaged``; when no step restores, the error names
        each one and why."""
        damaged: dict[int, str] = {}
        ignore_abandoned_reads()  # a failed restore's reads still in flight report nothing useful
        for step in sorted(self.all_steps(), reverse=True):
            why = "unreadable on another process"
            try:
                got = self.restore(abstract_state, step, check_meta=check_meta)
            except DamagedCheckpointError as e:
                got, why = None, str(e)
            if not _on_every_process(got is not None):
                damaged[step] = why
                continue
            self._set_aside(damaged, step)
            return Restored(*got, damaged=damaged)
        if not damaged:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
        raise CheckpointError(f"{self.directory}: no checkpoint restores: "
                              + "; ".join(f"step {s}: {why}" for s, why in damaged.items()))

    def _set_aside(self, damaged: dict[int, str], restored_step: int) -> None:
        """Renames each damaged step directory to ``STEP.damaged`` (process 0), so that the run can save
        those steps again and a later resume does not meet them."""
        if not damaged:
            return
        if jax.process_index() == 0:
            for step in damaged:
                src = os.path.join(self.directory, str(step))
                dst, n = f"{src}.damaged", 1
                while os.path.exists(dst):
                    n += 1
                    dst = f"{src}.damaged-{n}"
                os.rename(src, dst)
                log.warning("checkpoint step %d is damaged, set aside as %s: %s", step, dst, damaged[step])
            log.warning("resuming from step %d, the newest checkpoint that restores", restored_step)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("m1_jax.checkpoint.set_aside")
        self.manager.reload()


def _on_every_process(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([ok], np.int32))))


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
