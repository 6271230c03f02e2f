"""When an ``m1 aot`` plan does not fit the chips' HBM: by how much, and the nearest plan that would.

XLA's TPU compiler refuses a program that needs more HBM than a chip has (``RESOURCE_EXHAUSTED``), and
its message holds both numbers (:func:`hbm_shortfall`). To point at a plan that fits,
:func:`nearest_fit` estimates what each device holds (:class:`StateModel`): the parameters, for
``train`` and ``rl`` (the RL update holds the train step's state) also their gradients and AdamW's two
moments (of a LoRA run's adapters only: its base is frozen, its experts int8 with ``base=int8``), for ``decode`` / ``prefill`` the inference cache, each divided over the mesh as the sharding
rules (:mod:`m1_jax.sharding`) divide it, plus the largest weight that ``fsdp`` gathers whole (one
layer's slice of the stacked weights); with int8 weights (``quantize``, :mod:`m1_jax.quant`) the
parameters are the quantized model's, the int8 values (1 byte each) and their float32 scales. What the
given plan needs beyond its own estimate (activations, XLA's temporaries, the batch, for ``rl`` with its
float32 arrays) is taken to be the same on every candidate. It is an estimate: a plan that fits by it
still has to be compiled to be sure.

Candidates: the given topology, then larger ones of the same TPU generation (one dimension doubled at
a time, up to the generation's largest slice); on each, every mesh over its devices that the model and
the batch allow, nearest to the given mesh first (fewest doublings and halvings of its axes; growing
``fsdp`` before ``expert``, ``tensor`` and ``data``, since only ``data`` does not divide parameters).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from m1_jax import aot, sharding, train
from m1_jax.cache import cache_shapes, cache_shardings, round_max_len
from m1_jax.config import M1Config
from m1_jax.model import M1Model, abstract_model
from m1_jax.quant.spec import resolve as resolve_quantize

GiB = aot.GiB
# The largest slice of each generation, dimensions in ascending order (Cloud TPU documentation).
MAX_SLICE = {"v4": (16, 16, 16), "v5p": (16, 20, 28), "v5e": (16, 16), "v5litepod": (16, 16), "v6e": (16, 16)}
# Axes in the order a plan that does not fit should grow them: the first three divide parameters.
GROWTH_ORDER = ("fsdp", "expert", "tensor", "data")
# fsdp shards a weight along its embed dimension; to use it, each device gathers it whole for a moment.
GATHERED = "largest weight gathered over fsdp"
# The part of a candidate's need beyond the estimate, taken to be what it is on the given plan.
OTHER = "activations and temporaries as on the given plan"
# Modes whose step holds gradients and AdamW's two moments next to the parameters.
OPTIMIZER_MODES = ("train", "rl")
ESTIMATE_NOTE = ("estimate: parameters (int8 weights as stored), gradients and AdamW moments (train, rl) or the "
                 "inference cache (decode, prefill) as the mesh shards them, the largest weight fsdp gathers, and "
                 "the rest of the given plan's need as it is; compile the plan to confirm")

_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
# "... required for HLO temporaries (33.03G) exceeds available HBM (15.75G)", "Used 20.5G of 15.75G hbm"
_SHORTFALL = (re.compile(rf"\({_SIZE}\) exceeds available HBM \({_SIZE}\)", re.IGNORECASE),
              re.compile(rf"Used {_SIZE} of {_SIZE} hbm", re.IGNORECASE))


def hbm_shortfall(message: str) -> tuple[int, int] | None:
    """(bytes needed, bytes available) per device from an XLA out-of-HBM message, or None."""
    for pattern in _SHORTFALL:
        m = pattern.search(message)
        if m:
            need, need_unit, have, have_unit = m.groups()
            return round(float(need) * _UNITS[need_unit.upper()]), round(float(have) * _UNITS[have_unit.upper()])
    return None


@dataclasses.dataclass(frozen=True)
class Fit:
    """A plan and its estimated bytes per device."""
    topology: str
    mesh: str
    batch: int
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.parts.items() if v)
        return f"{self.total / GiB:.2f} GiB per device ({parts})"


class StateModel:
    """What one plan keeps in HBM, as shapes and logical axis names, ready to be divided over meshes.

    ``quantize``: int8 weights (``"int8"`` or a :class:`m1_jax.quant.QuantConfig`; inference modes only):
    the parameters are then the quantized model's, int8 values and float32 scales, sharded as it shards them."""

    def __init__(self, cfg: M1Config, mode: str, *, context: int, param_dtype, dtype, quantize=None, run=None):
        quantize = resolve_quantize(quantize)
        if quantize is not None and mode in OPTIMIZER_MODES:
            raise ValueError(f"int8 weights are for inference: quantize does not apply to mode {mode!r}")
        self.cfg, self.mode, self.context, self.dtype = cfg, mode, context, dtype
        if mode == "train" and run is not None and train.lora_config(run) is not None:
            # a LoRA run (``run``'s lora section): the adapters (and the int8 base) as m1 train adds them
            model = nnx.eval_shape(lambda: train.with_lora(
                M1Model(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype), run))
        else:
            model = abstract_model(cfg, param_dtype=param_dtype, dtype=dtype, quantize=quantize)
        params = nnx.state(model, nnx.Param)
        names = jax.tree.leaves(nnx.get_partition_spec(params), is_leaf=lambda x: isinstance(x, P))
        paths = [p for p, _ in nnx.to_flat_state(params)]  # the order of the leaves
        trained = {p for p, _ in nnx.to_flat_state(nnx.state(model, train.trainable(model)))}
        # (logical axis names, shape, bytes per element, whether the optimizer trains it)
        self.params = [(tuple(n) + (None,) * (v.ndim - len(n)), v.shape, v.dtype.itemsize,
                        mode in OPTIMIZER_MODES and p in trained)
                       for n, v, p in zip(names, jax.tree.leaves(params), paths, strict=True)]

    def parameter_floor(self, devices: int) -> float:
        """Bytes per device of the parameters (and for train and rl the gradients and moments of those the
        optimizer trains) were they divided evenly over ``devices``: no mesh of that many devices holds less."""
        return sum(math.prod(s) * i * (4 if t else 1) for _, s, i, t in self.params) / devices

    def per_device(self, mesh: Mesh, batch: int) -> dict[str, int]:
        """Bytes per device by part; raises :class:`m1_jax.sharding.MeshError` when ``mesh`` cannot
        shard a parameter or the cache."""
        params = gathered = trained = 0
        for names, shape, size, is_trained in self.params:
            spec = sharding.logical_to_spec(names, mesh, shape, "parameter")
            shard = math.prod(NamedSharding(mesh, spec).shard_shape(shape)) * size
            params += shard
            trained += shard if is_trained else 0
            if any(a == "fsdp" or (isinstance(a, tuple) and "fsdp" in a) for a in spec):
                per_layer = shard // shape[0] if names[0] == "layers" else shard  # the layer scan gathers one
                gathered = max(gathered, per_layer * mesh.shape["fsdp"])
        parts = {"parameters": params, GATHERED: gathered}
        if self.mode in OPTIMIZER_MODES:
            parts["gradients"] = trained
            parts["AdamW moments"] = 2 * trained
        if self.mode in ("decode", "prefill"):
            parts["cache"] = self._cache(batch, mesh)
        return parts

    def _cache(self, batch: int, mesh: Mesh) -> int:
        shapes = cache_shapes(self.cfg, batch, round_max_len(self.context), self.dtype)
        shardings = jax.tree.leaves(cache_shardings(shapes, mesh))
        return sum(math.prod(sh.shard_shape(s.shape)) * s.dtype.itemsize
                   for s, sh in zip(jax.tree.leaves(shapes), shardings))


def larger_topologies(topology: str):
    """``topology`` and then the same generation with one dimension doubled at a time (the last of the
    smallest, so that e.g. ``v5e:2x2`` grows to ``2x4``, ``4x4``, ...) up to its largest slice."""
    gen, _, shape = topology.partition(":")
    try:
        dims = [int(d) for d in shape.lower().split("x")]
    except ValueError:
        return
    yield topology
    largest = MAX_SLICE.get(gen.lower())
    if largest is None or len(dims) != len(largest):
        return
    while True:
        i = max(j for j, d in enumerate(dims) if d == min(dims))
        dims[i] *= 2
        if any(d > m for d, m in zip(sorted(dims), largest)):
            return
        yield f"{gen}:{'x'.join(map(str, dims))}"


def meshes_near(sizes: dict[str, int], n: int) -> list[dict[str, int]]:
    """Every mesh of ``n`` devices, nearest to ``sizes`` first (the sum of |log2| of the axis ratios;
    then the growth order, :data:`GROWTH_ORDER`)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    out = []
    for data, fsdp, expert in itertools.product(divisors, repeat=3):
        rest, r = divmod(n, data * fsdp * expert)
        if r == 0:
            out.append(dict(zip(sharding.MESH_AXES, (data, fsdp, expert, rest))))
    ratio = lambda m, a: m[a] / sizes[a]
    return sorted(out, key=lambda m: (sum(abs(math.log2(ratio(m, a))) for a in sharding.MESH_AXES),
                                      tuple(-ratio(m, a) for a in GROWTH_ORDER)))


def nearest_fit(cfg: M1Config, topology: str, mesh_sizes: dict[str, int], mode: str, *, batch: int | None,
                context: int, param_dtype, dtype, available: int, needed: int | None = None, quantize=None,
                run=None) -> tuple[Fit | None, Fit]:
    """(the nearest other plan that fits ``available`` bytes per device by the estimate, or None; the
    estimate of the given plan).

    ``batch``: the global batch the user fixed (None: one row per data-parallel shard, as ``m1 aot``
    defaults it, so that it grows with the mesh). ``needed``: what the given plan really needs per
    device (from XLA); what it needs beyond its estimate (activations, temporaries) is counted for
    every candidate too. ``quantize``: the plan's int8 weights; ``run``: a train plan's run config, whose
    LoRA adapters are then all the optimizer trains (:class:`StateModel`)."""
    state = StateModel(cfg, mode, context=context, param_dtype=param_dtype, dtype=dtype, quantize=quantize,
                       run=run)

    def estimate(topo: str, grid: np.ndarray, sizes: dict[str, int]) -> Fit:
        mesh = Mesh(grid.reshape(tuple(sizes[a] for a in sharding.MESH_AXES)), sharding.MESH_AXES)
        rows = batch or sharding.axis_size(mesh, sharding.BATCH_AXES)
        sharding.check_mesh(cfg, mesh)
        sharding.check_batch(rows, mesh)
        return Fit(topo, sharding.format_mesh_spec(sizes), rows, state.per_device(mesh, rows))

    given, extra = None, 0
    for topo in larger_topologies(topology):
        try:
            devices = aot.topology_devices(topo)
        except ValueError:  # a shape libtpu does not build: the next one may be valid
            if topo == topology:
                raise
            continue
        grid = np.empty(len(devices), dtype=object)
        grid[:] = devices
        if given is None:  # the first topology is the given one
            given = estimate(topo, grid, mesh_sizes)
            extra = max(0, (needed or 0) - given.total)
        if state.parameter_floor(len(devices)) + extra > available:
            continue  # even divided over every device the parameters would not fit
        for sizes in meshes_near(mesh_sizes, len(devices)):
            if topo == topology and sizes == mesh_sizes:
                continue
            try:
                fit = estimate(topo, grid, sizes)
            except sharding.MeshError:
                continue
            if fit.total + extra <= available:
                return (dataclasses.replace(fit, parts={**fit.parts, OTHER: extra})
                        if extra else fit), given
    return None, given
