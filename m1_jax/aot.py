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
* ``rl``: the RL policy update (:func:`m1_jax.rl.update.update_step_fn`, as
  :class:`m1_jax.rl.update.PolicyState` compiles it): the objective (CISPO by default) over ``[batch,
  seq_len]`` rows of prompt + response tokens with their float32 loss mask, behaviour log-probs and
  advantages (and the reference's log-probs with a KL term), gradient accumulation, clipping, AdamW with
  the report's RL settings (:func:`m1_jax.rl.update.rl_optimizer_section`), the non-finite guard, over the
  same train state shardings.
* ``forward``: logits for ``[batch, seq_len]`` tokens.
* ``decode``: one token per row against an inference cache of ``context`` tokens (lightning states +
  softmax KV caches, :mod:`m1_jax.cache`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
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
from m1_jax.quant.spec import resolve as resolve_quantize
from m1_jax.rl.objectives import make_objective
from m1_jax.rl.update import UPDATE_KEYS, UpdateOptions, rl_optimizer_section, update_batch_shardings, update_step_fn
from m1_jax.run_config import RunConfig
from m1_jax.serving import steps as serving_steps
from m1_jax.serving.engine import default_prefill_rows
from pallas_kernels.platform import tpu_target

log = logging.getLogger(__name__)

GiB = 2 ** 30
# HBM per chip by TPU generation (GiB).
HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}
MODES = ("train", "rl", "forward", "decode", "prefill", "serve")


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
        import libtpu  # noqa: F401
        from jax.experimental import topologies
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
    head_dtype: str = ""  # the output head's matmul dtype ("": the compute dtype)
    quantize: str = ""  # int8 weights (m1_jax.quant): "int8 experts", "int8 experts + attention"; "": none
    # XLA's cost analysis, per device, loop bodies counted once like ``flops``: HBM bytes accessed and its
    # estimate of the program's time on the chip ("optimal_seconds"); None where XLA does not give them
    bytes_accessed: float | None = None
    xla_seconds: float | None = None

    @property
    def total_bytes(self) -> int:
        """Per-device need as a sum: arguments + temporaries + outputs not aliased to (donated) arguments + code
        (an upper bound of what XLA allocates, :attr:`fits`)."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes + \
            self.generated_code_bytes

    @property
    def sum_fits(self) -> bool | None:
        """Whether :attr:`total_bytes` (an upper bound: it adds up temporaries XLA may place in the same bytes
        at different times) is within the chip's HBM; None where the HBM is not known."""
        return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes

    @property
    def fits(self) -> bool | None:
        """Whether the step fits the chip's HBM. A compiled report fits: XLA refuses to compile a TPU program
        whose buffer assignment exceeds the HBM (``m1 aot`` reports that refusal instead), and its buffer
        assignment can overlap temporaries that :attr:`total_bytes` counts apart. None where the HBM is not
        known."""
        return None if self.hbm_bytes is None else True

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(total_bytes=self.total_bytes, fits=self.fits, sum_fits=self.sum_fits)
        return d

    def table(self) -> str:
        gb = lambda b: f"{b / GiB:9.2f} GiB"
        hbm = "unknown" if self.hbm_bytes is None else gb(self.hbm_bytes).strip()
        fits = {None: "?", True: "fits", False: (
            f"fits: {(self.total_bytes - self.hbm_bytes) / GiB:.2f} GiB over as a sum, but within XLA's own HBM "
            "check, whose buffer assignment overlaps temporaries the sum counts apart")}[self.sum_fits]
        shape = {"decode": f"batch {self.batch} x context {self.context} (one new token)",
                 "prefill": f"batch {self.batch} x chunk {self.seq_len} on context {self.context}",
                 "rl": f"batch {self.batch} x seq {self.seq_len}, prompt + response",
                 "serve": f"{self.batch} slots x context {self.context}, one new token each"}.get(
                     self.mode, f"batch {self.batch} x seq {self.seq_len}")
        lines = [
            f"mode            {self.mode} ({shape})",
            f"topology        {self.topology}: {self.devices} devices, mesh {self.mesh}",
            (f"dtypes          params {self.param_dtype}{' with ' + self.quantize if self.quantize else ''}, "
             f"compute {self.compute_dtype}, "
             f"head {self.head_dtype or self.compute_dtype}, lightning {self.lightning_impl}"),
            f"compile time    {self.compile_s:.1f} s",
            "per device:",
            f"  arguments     {gb(self.argument_bytes)}",
            f"  outputs       {gb(self.output_bytes)} ({gb(self.alias_bytes).strip()} aliased to donated arguments)",
            f"  temporaries   {gb(self.temp_bytes)}",
            f"  code          {gb(self.generated_code_bytes)}",
            f"  total need    {gb(self.total_bytes)} of {hbm} HBM: {fits}",
            (f"FLOPs per step  {self.model_flops:.4g} model FLOPs ({self.model_flops / self.devices:.4g} per device; "
             f"m1_jax.flops)"),
            f"XLA cost        {self.flops:.4g} FLOPs per device (loop bodies, e.g. the layer scan, counted once)"
            if self.flops else "XLA cost        not reported",
        ]
        if self.bytes_accessed is not None or self.xla_seconds is not None:
            lines.append("XLA estimate    " + ", ".join(
                ([f"{self.bytes_accessed / GiB:.4g} GiB accessed"] if self.bytes_accessed is not None else [])
                + ([f"{self.xla_seconds * 1e3:.4g} ms"] if self.xla_seconds is not None else []))
                + " per device (the same loop bodies once; not a measured time)")
        if self.note:
            lines.append(f"note            {self.note}")
        return "\n".join(lines)


def _tokens(mesh, batch: int, length: int):
    sh = NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"), mesh, (batch, length), "tokens"))
    return jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sh)


def _sds(tree, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def lower_step(cfg: M1Config, mesh, mode: str, *, batch: int, seq_len: int, context: int, model_kw: dict,
               run: RunConfig, update: UpdateOptions | None = None):
    """``mode``'s step lowered for ``mesh`` -> (lowered computation, note for the report).

    Each mode lowers the function that runs: ``train`` the train step of ``m1 train`` (:func:`m1_jax.train.jit_train_step`, with ``run``'s optimizer and step
    options and :class:`M1Model` options ``model_kw``), ``rl`` the RL update step that
    :func:`m1_jax.rl.update.build_policy_state` compiles (objective, micro-batches and remat from ``update``,
    default :class:`m1_jax.rl.update.UpdateOptions`; its optimizer's defaults), ``forward`` / ``decode`` /
    ``prefill`` the model's own forward (:meth:`M1Model.forward`)."""
    if mode == "train":
        tx, opts, schedule = train.step_setup(cfg, run)
        graphdef, state, state_sh = abstract_train_state(cfg, mesh, tx, model_kw, run)
        step = train.jit_train_step(graphdef, state_sh, mesh, opts, schedule)
        lora = train.lora_config(run)
        # (an int8 base shows in the report's dtypes line)
        note = "" if lora is None else f"LoRA rank {lora.rank}, alpha {lora.alpha:g}, targets {','.join(lora.targets)}"
        return step.lower(state, train_batch(mesh, batch, seq_len)), note
    if mode == "rl":
        update = update or UpdateOptions()
        # build_policy_state's optimizer: the report's AdamW over one update's schedule (the schedule is a
        # constant of the program, not part of its memory)
        section = rl_optimizer_section()
        graphdef, state, state_sh = abstract_train_state(cfg, mesh, train.make_optimizer(section, 1), model_kw)
        objective = make_objective(update.objective, **dict(update.objective_options))
        step = update_step_fn(graphdef, objective, train.learning_rate_schedule(section, 1),
                              micro_batches=update.micro_batches, remat=update.remat)
        rows = rl_batch(mesh, batch, seq_len, with_ref=uses_reference(update))
        jitted = train.jit_step(step, state_sh, {k: v.sharding for k, v in rows.items()}, mesh)
        return jitted.lower(state, rows), rl_note(update)
    model = abstract_model(cfg, **model_kw)
    model.mesh = mesh  # the forward then constrains activations and runs the expert-parallel MoE
    graphdef, params = nnx.split(model)
    params = _sds(params, sharding.state_shardings(params, mesh))
    if mode == "forward":
        fn = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
        return fn.lower(params, _tokens(mesh, batch, seq_len)), ""
    if mode == "serve":
        return serve_step(cfg, mesh, graphdef, params, slots=batch, context=context, dtype=model_kw["dtype"])
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


def serve_step(cfg: M1Config, mesh, graphdef, params, *, slots: int, context: int, dtype):
    """``m1 serve``'s decode step (``m1_jax.serving.steps.for_model(...).decode_step``: per-slot sampling, then one token
    fed to every slot) lowered for ``slots`` slots of ``context`` tokens -> (lowered, note). The note adds
    what the engine holds beside it: the cache of its default prefill rows."""
    shapes = cache_shapes(cfg, slots, round_max_len(context), dtype)

    def rows(dt, *tail):
        shape = (slots, *tail)
        names = ("batch",) + (None,) * len(tail)
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding.named_sharding(names, mesh, shape))

    lowered = serving_steps.for_model(graphdef).decode_step.lower(
        params, _sds(shapes, cache_shardings(shapes, mesh)), rows(jnp.int32), rows(jnp.int32),
        rows(jnp.bool_), rows(jnp.bool_), rows(jnp.float32), rows(jnp.int32), rows(jnp.float32), rows(jnp.uint32, 2),
        rows(jnp.int32))
    prefill_rows = default_prefill_rows(mesh)
    pshapes = cache_shapes(cfg, prefill_rows, shapes.max_len, dtype)
    per_device = sum(math.prod(sh.shard_shape(a.shape)) * a.dtype.itemsize for a, sh in
                     zip(jax.tree.leaves(pshapes), jax.tree.leaves(cache_shardings(pshapes, mesh))))
    return lowered, (f"serve decode step: {slots} slots x {shapes.max_len} tokens (m1_jax.serving.steps); the engine "
                     f"also holds {prefill_rows} prefill row(s): {per_device / GiB:.2f} GiB per device more, plus "
                     "the prefix cache's budget")


def abstract_train_state(cfg: M1Config, mesh, tx, model_kw: dict, run: RunConfig | None = None):
    """(graphdef, abstract state, state shardings) of the ``(model, optimizer)`` train state
    (:func:`m1_jax.train.model_and_optimizer`) with optimizer ``tx``, as shapes only: what the train and RL
    update steps take. ``run``: its LoRA adapters (and int8 base) as :func:`m1_jax.train.build_train_state`
    adds them."""

    def build():
        model = M1Model(cfg, rngs=nnx.Rngs(0), **model_kw)
        return train.model_and_optimizer(model if run is None else train.with_lora(model, run), tx, mesh)

    state_graph = nnx.eval_shape(build)
    graphdef, state = nnx.split(state_graph)
    state_sh = sharding.state_shardings(state, mesh)
    return graphdef, _sds(state, state_sh), state_sh


def train_batch(mesh, batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract packed batch the train step takes (:data:`m1_jax.train.BATCH_KEYS`)."""
    return {k: _tokens(mesh, batch, seq_len) for k in train.BATCH_KEYS}


def uses_reference(update: UpdateOptions) -> bool:
    """Whether the update's objective has a KL term, so that its batch holds the reference's log-probs."""
    return float(update.objective_options.get("kl_coef", 0.0)) > 0


def rl_batch(mesh, batch: int, seq_len: int, *, with_ref: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract batch the RL update step takes (:mod:`m1_jax.rl.update`): int32 tokens, float32 loss
    mask / behaviour log-probs (/ reference log-probs) ``[batch, seq_len]`` and advantages ``[batch]``, on
    :func:`m1_jax.rl.update.update_batch_shardings`."""
    keys = UPDATE_KEYS if with_ref else UPDATE_KEYS[:-1]
    return {k: jax.ShapeDtypeStruct((batch,) if k == "advantages" else (batch, seq_len),
                                    jnp.int32 if k == "tokens" else jnp.float32, sharding=sh)
            for k, sh in update_batch_shardings(mesh, keys).items()}


def rl_note(update: UpdateOptions) -> str:
    """The report's note on an RL update: its objective with the options set, micro-batches, AdamW settings."""
    options = "".join(f", {k} {v}" for k, v in sorted(update.objective_options.items()))
    m = update.micro_batches
    return (f"RL update (m1_jax.rl.update): objective {update.objective}{options}, {m} micro-batch{'es' * (m > 1)}, "
            f"AdamW b2 {rl_optimizer_section().b2} eps {rl_optimizer_section().eps:g}")


def plan(cfg: M1Config, topology: str, mesh_spec: str, mode: str, *, batch: int = 1, seq_len: int = 8192,
         context: int = 1 << 20, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16,
         lightning_impl: str = "auto", remat: str = "none", run: RunConfig | None = None,
         update: UpdateOptions | None = None, quantize=None) -> AotReport:
    """Compiles ``mode`` for ``topology`` and returns the per-device report.

    ``run`` (train mode): the run config whose optimizer and step options (micro-batches, z-loss) the
    train step uses, as ``m1 train`` would; default :class:`m1_jax.run_config.RunConfig` defaults.
    ``remat`` overrides its ``model.remat``; its ``model.head_dtype`` sets the output head's matmul dtype (every
    mode; "auto": the compute dtype). ``update`` (rl mode): the update's objective (with its options,
    e.g. ``{"kl_coef": 0.01}``) and micro-batches, default :class:`m1_jax.rl.update.UpdateOptions`;
    ``remat`` overrides its ``remat``. ``seq_len`` is then the prompt + response length of a row.
    ``quantize``: int8 weights (``"int8"`` or a :class:`m1_jax.quant.QuantConfig`) for the inference modes."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    quantize = resolve_quantize(quantize)
    if quantize is not None and mode in ("train", "rl"):
        raise ValueError(f"int8 weights are for inference: --quantize does not apply to --mode {mode}")
    update = dataclasses.replace(update or UpdateOptions(), remat=remat)
    if mode == "rl":
        m = update.micro_batches
        if isinstance(m, bool) or not isinstance(m, int) or m < 1 or batch % m:
            raise ValueError(f"micro_batches must be a positive integer dividing batch={batch}, got {m!r}")
        make_objective(update.objective, **dict(update.objective_options))  # a bad name or option: before libtpu
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(mesh_spec, devices)
    sharding.check_mesh(cfg, mesh)
    sharding.check_batch(batch, mesh)
    run = run_for_plan(run, remat)
    model_kw = {**train.model_options(run), "param_dtype": param_dtype, "dtype": dtype,
                "lightning_impl": lightning_impl, "quantize": quantize}
    t0 = time.perf_counter()
    with tpu_target():
        lowered, note = lower_step(cfg, mesh, mode, batch=batch, seq_len=seq_len, context=context, model_kw=model_kw,
                                   run=run, update=update)
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
        bytes_accessed=float(cost["bytes accessed"]) if "bytes accessed" in cost else None,
        # negative where XLA cannot estimate a part (e.g. a Pallas kernel): then no estimate
        xla_seconds=float(cost["optimal_seconds"]) if cost.get("optimal_seconds", -1) > 0 else None,
        # the RL update runs the train step's passes (forward + backward over every token)
        model_flops=step_flops(cfg, {"rl": "train", "serve": "decode"}.get(mode, mode), batch=batch, seq_len=seq_len,
                               context=context),
        note=note if remat == "none" else f"remat {remat}; {note}".rstrip("; "),
        head_dtype=jnp.dtype(model_kw.get("head_dtype") or dtype).name,
        quantize=("int8 experts" + (" + attention" if quantize.attention else "") if quantize is not None
                  else "int8 experts" if mode == "train" and train.lora_config(run) and run.lora.base == "int8"
                  else ""))
