"""Ahead-of-time planning of a TPU pod on any host: compile the model for an abstract TPU topology and
report what one device needs.

``jax.experimental.topologies.get_topology_desc`` (libtpu, the ``[tpu]`` extra) gives abstract TPU
devices; the mesh is built over them, the step is lowered with ``jax.ShapeDtypeStruct`` inputs that
carry their shardings (parameters come from :func:`m1_jax.model.abstract_model`, so nothing is
allocated) and compiled by the real TPU compiler (Pallas kernels through Mosaic). The report holds
``compiled.memory_analysis()`` (per-device argument / output / temporary bytes), the HBM of the chip,
the step's model FLOPs (:func:`m1_jax.flops.step_flops`) next to ``compiled.cost_analysis()`` FLOPs
(XLA counts the body of a loop once, so with the scanned layers it reports about one period), and the
compile time.

Steps:

* ``train``: the train step that ``m1 train`` runs (:func:`m1_jax.train.jit_train_step`: masked cross entropy
  + aux loss, gradient accumulation, clipping, AdamW on the run config's schedule, the non-finite guard),
  over the same train state shardings (:class:`m1_jax.train.TrainState`); ``remat`` rematerialises each
  layer period in the backward pass.
* ``forward``: logits for ``[batch, seq_len]`` tokens.
* ``decode``: one token per row against an inference cache of ``context`` tokens (lightning states +
  softmax KV caches, :mod:`m1_jax.cache`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from m1_jax import sharding, train
from m1_jax.cache import cache_shapes, cache_shardings, round_max_len
from m1_jax.config import M1Config
from m1_jax.flops import step_flops
from m1_jax.model import M1Model, abstract_model
from m1_jax.run_config import RunConfig
from pallas_kernels.platform import tpu_target

log = logging.getLogger(__name__)

GiB = 2 ** 30
# HBM per chip by TPU generation (GiB).
HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}
MODES = ("train", "forward", "decode", "prefill")


def run_for_plan(run: RunConfig | None, remat: str) -> RunConfig:
    """A copy of ``run`` (default: the defaults) with ``model.remat`` = ``remat``."""
    run = RunConfig() if run is None else copy.deepcopy(run)
    run.model.remat = remat
    return run


def chip_generation(topology: str) -> str:
    return topology.split(":", 1)[0].lower()


def topology_devices(topology: str) -> list:
    """Abstract TPU devices of ``topology`` (e.g. ``v5p:4x4x4``); needs libtpu."""
    try:
        from jax.experimental import topologies
        import libtpu  # noqa: F401
    except ImportError as e:
        raise ValueError(f"topology {topology}: TPU AOT compilation needs libtpu "
                           f"(pip install 'm1-jax[tpu]'): {e}") from None
    if ":" not in topology:
        raise ValueError(f"topology {topology!r}: expected GENERATION:SHAPE, e.g. v5p:4x4x4 or v5e:2x2")
    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # noqa: BLE001 - libtpu's message is the useful part
        raise ValueError(f"topology {topology!r}: libtpu cannot build it: {e}") from None
    return list(desc.devices)


@dataclasses.dataclass
class AotReport:
    mode: str
    topology: str
    mesh: str
    devices: int
    batch: int
    seq_len: int
    context: int
    param_dtype: str
    compute_dtype: str
    lightning_impl: str
    compile_s: float
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    generated_code_bytes: int
    hbm_bytes: int | None
    flops: float | None  # XLA's cost analysis, per device: a loop body (the layer scan) is counted once
    model_flops: float  # m1_jax.flops.step_flops: the step's model FLOPs over all devices
    note: str = ""

    @property
    def total_bytes(self) -> int:
        """Peak per-device need: arguments + temporaries + outputs not aliased to (donated) arguments."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes + \
            self.generated_code_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(total_bytes=self.total_bytes, fits=self.fits)
        return d

    def table(self) -> str:
        gb = lambda b: f"{b / GiB:9.2f} GiB"
        hbm = "unknown" if self.hbm_bytes is None else gb(self.hbm_bytes).strip()
        fits = {None: "?", True: "fits", False: "DOES NOT FIT"}[self.fits]
        shape = {"decode": f"batch {self.batch} x context {self.context} (one new token)",
                 "prefill": f"batch {self.batch} x chunk {self.seq_len} on context {self.context}"}.get(
                     self.mode, f"batch {self.batch} x seq {self.seq_len}")
        lines = [
            f"mode            {self.mode} ({shape})",
            f"topology        {self.topology}: {self.devices} devices, mesh {self.mesh}",
            f"dtypes          params {self.param_dtype}, compute {self.compute_dtype}, lightning {self.lightning_impl}",
            f"compile time    {self.compile_s:.1f} s",
            "per device:",
            f"  arguments     {gb(self.argument_bytes)}",
            f"  outputs       {gb(self.output_bytes)} ({gb(self.alias_bytes).strip()} aliased to donated arguments)",
            f"  temporaries   {gb(self.temp_bytes)}",
            f"  code          {gb(self.generated_code_bytes)}",
            f"  total need    {gb(self.total_bytes)} of {hbm} HBM: {fits}",
            f"FLOPs per step  {self.model_flops:.4g} model FLOPs ({self.model_flops / self.devices:.4g} per device; "
            f"m1_jax.flops)",
            f"XLA cost        {self.flops:.4g} FLOPs per device (loop bodies, e.g. the layer scan, counted once)"
            if self.flops else "XLA cost        not reported",
        ]
        if self.note:
            lines.append(f"note            {self.note}")
        return "\n".join(lines)


def _tokens(mesh, batch: int, length: int):
    sh = NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"), mesh, (batch, length), "tokens"))
    return jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sh)


def _sds(tree, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def lower_step(cfg: M1Config, mesh, mode: str, *, batch: int, seq_len: int, context: int, model_kw: dict,
               run: RunConfig):
    """``mode``'s step lowered for ``mesh`` -> (lowered computation, note for the report).

    Each mode lowers the function that runs: ``train`` the train step of ``m1 train`` (:func:`m1_jax.train.jit_train_step`, with ``run``'s optimizer and step
    options and :class:`M1Model` options ``model_kw``), ``forward`` / ``decode`` / ``prefill`` the model's own
    forward (:meth:`M1Model.forward`)."""
    if mode == "train":
        tx, opts, schedule = train.step_setup(cfg, run)
        state_graph = nnx.eval_shape(lambda: train.model_and_optimizer(M1Model(cfg, rngs=nnx.Rngs(0), **model_kw),
                                                                       tx, mesh))
        graphdef, state = nnx.split(state_graph)
        state_sh = sharding.state_shardings(state, mesh)
        step = train.jit_train_step(graphdef, state_sh, mesh, opts, schedule)
        return step.lower(_sds(state, state_sh), train_batch(mesh, batch, seq_len)), ""
    model = abstract_model(cfg, **model_kw)
    model.mesh = mesh  # the forward then constrains activations and runs the expert-parallel MoE
    graphdef, params = nnx.split(model)
    params = _sds(params, sharding.state_shardings(params, mesh))
    if mode == "forward":
        fn = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
        return fn.lower(params, _tokens(mesh, batch, seq_len)), ""
    new = 1 if mode == "decode" else seq_len
    if new > context:
        raise ValueError(f"seq_len {new} (the prefill chunk) exceeds context {context}")
    shapes = cache_shapes(cfg, batch, round_max_len(context), model_kw["dtype"])

    def cached_step(params, cache, tokens):
        out = nnx.merge(graphdef, params).forward(tokens, cache=cache, last_only=True)
        return out.cache, out.logits[:, 0]

    fn = jax.jit(cached_step, donate_argnums=(1,))
    note = (f"decode step: 1 new token per row, KV cache of {shapes.max_len} tokens (m1_jax.cache)" if new == 1 else
            f"prefill chunk: {new} new tokens per row on a KV cache of {shapes.max_len} tokens (m1_jax.cache); "
            f"a {context}-token prompt is {-(-context // new)} such chunks, memory bounded by one")
    return fn.lower(params, _sds(shapes, cache_shardings(shapes, mesh)), _tokens(mesh, batch, new)), note


def train_batch(mesh, batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract packed batch the train step takes (:data:`m1_jax.train.BATCH_KEYS`)."""
    return {k: _tokens(mesh, batch, seq_len) for k in train.BATCH_KEYS}


def plan(cfg: M1Config, topology: str, mesh_spec: str, mode: str, *, batch: int = 1, seq_len: int = 8192,
         context: int = 1 << 20, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16,
         lightning_impl: str = "auto", remat: str = "none", run: RunConfig | None = None) -> AotReport:
    """Compiles ``mode`` for ``topology`` and returns the per-device report.

    ``run`` (train mode): the run config whose optimizer and step options (micro-batches, z-loss) the
    train step uses, as ``m1 train`` would; default :class:`m1_jax.run_config.RunConfig` defaults.
    ``remat`` overrides its ``model.remat``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(mesh_spec, devices)
    sharding.check_mesh(cfg, mesh)
    sharding.check_batch(batch, mesh)
    run = run_for_plan(run, remat)
    model_kw = {**train.model_options(run), "param_dtype": param_dtype, "dtype": dtype,
                "lightning_impl": lightning_impl}
    t0 = time.perf_counter()
    with tpu_target():
        lowered, note = lower_step(cfg, mesh, mode, batch=batch, seq_len=seq_len, context=context, model_kw=model_kw,
                                   run=run)
        compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    gen = chip_generation(topology)
    hbm = HBM_GIB.get(gen)
    return AotReport(
        mode=mode, topology=topology, mesh=sharding.format_mesh_spec(mesh), devices=len(devices), batch=batch,
        seq_len=seq_len, context=context, param_dtype=jnp.dtype(param_dtype).name, compute_dtype=jnp.dtype(dtype).name,
        lightning_impl=lightning_impl, compile_s=compile_s,
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
        generated_code_bytes=int(mem.generated_code_size_in_bytes),
        hbm_bytes=None if hbm is None else hbm * GiB, flops=float(cost["flops"]) if "flops" in cost else None,
        model_flops=step_flops(cfg, mode, batch=batch, seq_len=seq_len, context=context),
        note=note if remat == "none" else f"remat {remat}; {note}".rstrip("; "))
