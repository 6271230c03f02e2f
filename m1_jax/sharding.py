"""Device meshes and the one table that maps logical axis names onto mesh axes.

Mesh axes, in this order: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters
sharded along their ``embed`` dimension), ``expert`` (MoE experts; data parallel outside the MoE),
``tensor`` (attention heads, vocabulary and expert width). A mesh spec is a string like
``"data=2,fsdp=-1,expert=8,tensor=4"``: missing axes have size 1 and one axis may be ``-1`` (the rest
of the devices).

Parameters carry logical axis names as NNX metadata (``out_sharding``, see ``layers/common.py``;
``layers`` for the stacked periods); :data:`RULES` maps each to mesh axes. Activations are
constrained at layer boundaries with the same table through :func:`constrain`, which is a no-op
unless a mesh is active (:func:`activate`, entered by ``M1Model.__call__`` when the model has a mesh).

KV heads (8 in M1) shard over ``tensor`` like the query heads when ``tensor`` divides them. When
``tensor`` is larger and a multiple of ``kv_heads`` (e.g. tensor=16) the k/v projections are
replicated over ``tensor`` instead: they are 2 x 6144 x 1024 weights in 10 of 80 layers, so the
extra memory and compute are small, and every query-head shard still finds its KV head locally.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from m1_jax.config import M1Config

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes that split the batch

# logical axis name -> mesh axis (or tuple of mesh axes, or None: replicated)
RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "length": None,
    "embed": "fsdp",  # parameters only; activations keep the hidden dimension whole
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",  # replicated when tensor > kv_heads (see module docstring)
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "layers": None,
}

# Activation layouts at layer boundaries.
HIDDEN = ("batch", "length", None)
LOGITS = ("batch", "length", "vocab")


class MeshError(ValueError):
    """A mesh spec or mesh that cannot run the model; the message names the flag and both numbers."""


# ---------------------------------------------------------------------------------------- meshes
def parse_mesh_spec(spec: str) -> dict[str, int]:
    """``"data=2,fsdp=-1"`` -> ``{"data": 2, "fsdp": -1, "expert": 1, "tensor": 1}``."""
    sizes = {a: 1 for a in MESH_AXES}
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\w+)\s*=\s*(-?\d+)", part)
        if not m:
            raise MeshError(f"mesh {spec!r}: cannot read {part!r}; expected AXIS=SIZE with AXIS one of "
                            f"{', '.join(MESH_AXES)} (e.g. data=2,fsdp=-1,expert=8,tensor=4)")
        name, size = m.group(1), int(m.group(2))
        if name not in MESH_AXES:
            raise MeshError(f"mesh {spec!r}: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
        if name in seen:
            raise MeshError(f"mesh {spec!r}: axis {name!r} given twice")
        if size == 0 or size < -1:
            raise MeshError(f"mesh {spec!r}: size of {name!r} must be positive or -1, got {size}")
        seen.add(name)
        sizes[name] = size
    if sum(v == -1 for v in sizes.values()) > 1:
        raise MeshError(f"mesh {spec!r}: at most one axis may be -1")
    return sizes


def make_mesh(spec: str | Mapping[str, int], devices: Sequence | None = None) -> Mesh:
    """A mesh with axes ``(data, fsdp, expert, tensor)`` (``Auto`` axis types) over ``devices``
    (default: all devices; abstract TPU devices from a topology work too)."""
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else {a: int(spec.get(a, 1)) for a in MESH_AXES}
    text = spec if isinstance(spec, str) else format_mesh_spec(sizes)
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    cpu = all(d.platform == "cpu" for d in devices)
    emulate = lambda k: (f"; on a CPU host emulate {k} devices: XLA_FLAGS=--xla_force_host_platform_device_count={k} "
                         f"in the environment before JAX starts" if cpu and k > n else "")
    known = math.prod(v for v in sizes.values() if v != -1)
    for a, v in sizes.items():
        if v == -1:
            if n % known:
                raise MeshError(f"mesh {text!r}: the other axes use {known} devices, which does not divide "
                                f"the {n} devices available{emulate(known)}")
            sizes[a] = n // known
    total = math.prod(sizes.values())
    if total != n:
        raise MeshError(f"mesh {text!r} needs {total} devices but {n} are available "
                        f"(use -1 for one axis to take the rest){emulate(total)}")
    shape = tuple(sizes[a] for a in MESH_AXES)
    types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=types)
    except NotImplementedError:  # an axis is not a product of whole torus axes: let it span part of one
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=types)


def as_mesh(mesh: Mesh | str | None) -> Mesh | None:
    return make_mesh(mesh) if isinstance(mesh, str) else mesh


def format_mesh_spec(mesh_or_sizes) -> str:
    sizes = dict(mesh_or_sizes.shape) if isinstance(mesh_or_sizes, (Mesh, AbstractMesh)) else dict(mesh_or_sizes)
    return ",".join(f"{a}={sizes.get(a, 1)}" for a in MESH_AXES)


def axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def check_mesh(cfg: M1Config, mesh: Mesh) -> None:
    """Raises :class:`MeshError` when ``mesh`` cannot shard ``cfg``'s heads, kv heads or experts."""
    spec = format_mesh_spec(mesh)
    t, e = mesh.shape["tensor"], mesh.shape["expert"]
    H, KV, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_local_experts
    if H % t:
        raise MeshError(f"mesh {spec}: tensor={t} does not divide num_attention_heads={H}")
    if KV % t and t % KV:
        raise MeshError(f"mesh {spec}: tensor={t} neither divides num_key_value_heads={KV} nor is a "
                        f"multiple of it")
    if E % e:
        raise MeshError(f"mesh {spec}: expert={e} does not divide num_local_experts={E}")


def check_batch(batch: int, mesh: Mesh) -> None:
    n = axis_size(mesh, BATCH_AXES)
    if batch % n:
        raise MeshError(f"mesh {format_mesh_spec(mesh)}: batch={batch} is not divisible by "
                        f"data*fsdp*expert={n} (the batch is split over these axes)")


# ---------------------------------------------------------------------------------------- rules
def logical_to_spec(names: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None,
                    what: str = "array") -> P:
    """Logical axis names -> ``PartitionSpec`` under :data:`RULES`.

    A mesh axis is used at most once (later dimensions that map to a used axis stay replicated); mesh
    axes of size 1 are dropped. With ``shape``, ``kv_heads`` falls back to replication when ``tensor``
    does not divide it, and any other dimension the mesh does not divide is a :class:`MeshError`.
    """
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in RULES:
            raise KeyError(f"logical axis {name!r} has no sharding rule (known: {', '.join(RULES)})")
        axes = RULES[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if shape is not None and axes:
            n = axis_size(mesh, axes)
            if shape[i] % n:
                if name == "kv_heads":
                    axes = ()
                else:
                    raise MeshError(f"mesh {format_mesh_spec(mesh)}: {what}: dimension {i} ({name}) of size "
                                    f"{shape[i]} is not divisible by {'*'.join(axes)}={n}")
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return P(*out)


def named_sharding(names: Sequence[str | None], mesh: Mesh, shape=None, what: str = "array") -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, mesh, shape, what))


def state_shardings(state, mesh: Mesh):
    """An NNX state (arrays or ``ShapeDtypeStruct`` leaves) -> the same pytree of ``NamedSharding``."""
    from flax import nnx

    logical = nnx.get_partition_spec(state)  # leaves: PartitionSpecs of logical names
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)]
    leaves, treedef = jax.tree.flatten(state)
    specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, P))
    out = [named_sharding(tuple(s) + (None,) * (v.ndim - len(s)), mesh, v.shape, what=f"parameter {path}")
           for s, v, path in zip(specs, leaves, paths)]
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------- activations
def activate(mesh: Mesh | AbstractMesh | None):
    """Context in which :func:`constrain` and the MoE / lightning / splash ``shard_map``s use ``mesh``.

    JAX's own mesh context: ``jax.set_mesh`` for a concrete mesh outside ``jax.jit`` (it also tells JAX the
    devices, so inputs not yet placed on the mesh work), ``jax.sharding.use_abstract_mesh`` inside ``jax.jit``
    (where only the abstract mesh may be set) or for an abstract mesh; a no-op for None."""
    if mesh is None:
        return contextlib.nullcontext()
    if isinstance(mesh, Mesh):
        try:
            return jax.set_mesh(mesh)
        except ValueError:  # raised inside jax.jit, where only the abstract mesh can be set
            mesh = mesh.abstract_mesh
    return jax.sharding.use_abstract_mesh(mesh)


def active_mesh() -> AbstractMesh | None:
    """The mesh of the enclosing :func:`activate` / ``jax.set_mesh`` context, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op without an active mesh."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(names, mesh, x.shape, what="activation"))


def spec(names: Sequence[str | None], shape=None) -> P:
    """The ``PartitionSpec`` of logical ``names`` under the active mesh (for shard_map specs)."""
    return logical_to_spec(names, active_mesh(), shape)


# ---------------------------------------------------------------------------------------- placement
def put_array(value: np.ndarray | jax.Array, sharding: NamedSharding) -> jax.Array:
    """A global array from a host buffer: each device receives only its own shard."""
    if isinstance(value, jax.Array):
        return jax.device_put(value, sharding)
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def shard_model(model, mesh: Mesh | str):
    """Places ``model``'s parameters on ``mesh`` by the rules and makes the model run sharded there."""
    from flax import nnx

    mesh = as_mesh(mesh)
    check_mesh(model.cfg, mesh)
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)
    state = jax.tree.map(put_array, state, shardings)
    model = nnx.merge(graphdef, state)
    model.mesh = mesh
    return model
