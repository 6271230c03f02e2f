"""Restoring a converted checkpoint directory (``m1 convert`` output) into an :class:`M1Model`.

Orbax restores the state into the abstract model's own layout; with a mesh, every parameter is read
directly into its shards (``m1_jax.sharding`` rules), so no host holds a whole parameter.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from m1_jax.config import M1Config
from m1_jax.convert import manifest as mf


def restore_state(path: str, cfg: M1Config, abstract, mesh=None):
    """The abstract model's state filled from ``path/state`` (on ``mesh`` when given)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    state = nnx.state(abstract)
    if mesh is not None:
        from m1_jax import sharding

        mesh = sharding.as_mesh(mesh)
        sharding.check_mesh(cfg, mesh)
        shardings = sharding.state_shardings(state, mesh)
    else:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, state)
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(path, mf.STATE_DIR), target)


def restore_model(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None, mesh=None,
                  require_complete: bool = True, **model_kw):
    """Loads a converted directory. ``param_dtype`` defaults to the converted dtype."""
    from flax import nnx

    from m1_jax.model import abstract_model

    path = os.fspath(path)
    if require_complete:
        record = mf.check_loadable(path)
    else:
        record = mf.read_record(path)
    cfg = M1Config.from_json(os.path.join(path, "config.json"))
    param_dtype = jnp.dtype(record["dtype"]) if param_dtype is None else param_dtype
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, **model_kw)
    graphdef, _ = nnx.split(abstract)
    model = nnx.merge(graphdef, restore_state(path, cfg, abstract, mesh))
    if mesh is not None:
        from m1_jax import sharding

        model.mesh = sharding.as_mesh(mesh)
    return model
