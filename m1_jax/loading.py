"""``from_pretrained``: a Hugging Face checkpoint directory, or one written by ``m1 convert``, -> a ready
:class:`M1Model`.

Hugging Face tensors are read one at a time through the key table (:mod:`m1_jax.checkpoint_io.keys`)
into their slots of the stacked parameters; every slot must be filled exactly once. Weights keep their
stored dtype (bf16 stays bf16; router gates are float32) unless ``param_dtype`` says otherwise; ``dtype``
is the compute dtype.

A converted directory already holds the model's own state layout: Orbax restores it into the abstract
model (:func:`restore_model`); with a mesh, every parameter is read directly into its shards
(:mod:`m1_jax.sharding` rules), so no host holds a whole parameter.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from m1_jax import sharding
from m1_jax.checkpoint_io import manifest as mf
from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.checkpoint_io.plan import plan_checkpoint
from m1_jax.checkpoint_io.safetensors_io import SafetensorsCheckpoint
from m1_jax.config import M1Config
from m1_jax.model import M1Model, abstract_model

log = logging.getLogger(__name__)


def _stored_param_dtype(ckpt: SafetensorsCheckpoint):
    """The checkpoint's storage dtype, read off the embedding table (the same key in every naming)."""
    key = "model.embed_tokens.weight"
    return jnp.dtype(ckpt.info(key).dtype) if key in ckpt else jnp.float32


def load_state(cfg: M1Config, ckpt: SafetensorsCheckpoint, abstract: M1Model, *, progress: bool = False):
    """Fills the abstract model's parameters from ``ckpt``; returns {flat path: np.ndarray}.

    The whole read is planned from the headers first (:func:`m1_jax.checkpoint_io.plan.plan_checkpoint`:
    unknown keys, wrong shapes, slots filled twice or never fail before any data is read).
    """
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    jobs = plan_checkpoint(cfg, ckpt, {p: v.shape for p, v in flat.items()})
    buffers: dict[tuple, np.ndarray] = {}
    for key, placements in tqdm(jobs, desc="loading", unit="tensor", disable=not progress):
        tensor = ckpt.read(key)
        for pl in placements:
            target = flat[pl.path]
            if pl.path not in buffers:
                buffers[pl.path] = np.empty(target.shape, target.dtype)
            buffers[pl.path][pl.slot] = pl.apply(tensor, target.shape[len(pl.slot):]).astype(target.dtype)
    return buffers


def restore_state(path: str, cfg: M1Config, abstract: M1Model, mesh=None) -> nnx.State:
    """The abstract model's state filled from the converted directory's ``path/state`` (on ``mesh``
    when given: a :class:`jax.sharding.Mesh` or a spec, each device reading only its shards)."""
    state = nnx.state(abstract)
    mesh = sharding.as_mesh(mesh)
    if mesh is not None:
        sharding.check_mesh(cfg, mesh)
        shardings = sharding.state_shardings(state, mesh)
    else:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, state)
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(path, mf.STATE_DIR), target)


def restore_model(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None, mesh=None,
                  require_complete: bool = True, **model_kw) -> M1Model:
    """Loads a directory written by ``m1 convert``. ``param_dtype`` defaults to the converted dtype;
    ``require_complete=False`` also reads an unfinished conversion (``m1 convert --verify`` does, before
    the directory is marked complete)."""
    path, mesh = os.fspath(path), sharding.as_mesh(mesh)
    record = mf.check_loadable(path) if require_complete else mf.read_record(path)
    cfg = M1Config.from_json(os.path.join(path, "config.json"))
    param_dtype = jnp.dtype(record["dtype"]) if param_dtype is None else param_dtype
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, **model_kw)
    graphdef, _ = nnx.split(abstract)
    model = nnx.merge(graphdef, restore_state(path, cfg, abstract, mesh))
    if mesh is not None:
        model.mesh = mesh
    return model


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None, progress: bool = False,
                    mesh=None, **model_kw) -> M1Model:
    """Loads a MiniMax-M1 checkpoint directory (config.json + safetensors, single file or sharded,
    original or transformers-5 key names), or a directory written by ``m1 convert`` (restored by Orbax,
    :func:`restore_model`), into an :class:`M1Model`.

    ``dtype``: compute dtype (float32 logits either way). ``param_dtype``: storage dtype, default as
    stored in the checkpoint. ``mesh``: a :class:`jax.sharding.Mesh` or a spec such as
    ``"data=1,fsdp=2,expert=2,tensor=2"`` (:mod:`m1_jax.sharding`): each device then receives only its
    shards of every parameter and the model runs sharded. Other keyword arguments go to
    :class:`M1Model` (``moe_impl``, ...).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if mf.is_converted(path):  # an `m1 convert` output: Orbax restores it straight into the model's layout
        return restore_model(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **model_kw)
    cfg = M1Config.from_json(os.path.join(path, "config.json"))
    ckpt = SafetensorsCheckpoint(path)
    if param_dtype is None:
        param_dtype = _stored_param_dtype(ckpt)
    mesh = sharding.as_mesh(mesh)
    if mesh is not None:
        sharding.check_mesh(cfg, mesh)
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, **model_kw)
    buffers = load_state(cfg, ckpt, abstract, progress=progress)
    graphdef, state = nnx.split(abstract)
    shardings = dict(nnx.to_flat_state(sharding.state_shardings(state, mesh))) if mesh is not None else {}
    flat = nnx.to_flat_state(state)
    for p, var in flat:
        if p in buffers:
            buf = buffers.pop(p)
            var.set_value(sharding.put_array(buf, shardings[p].get_value()) if mesh is not None
                          else jnp.asarray(buf))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    model.mesh = mesh
    return model
