"""Training: the loss, the optimizer, and the jit-compiled sharded train step.

Loss: next-token cross entropy in float32 over the tokens whose ``loss_mask`` is 1, plus
``router_aux_loss_coef`` times the MoE load-balancing loss, plus an optional z-loss
(``z * mean(logsumexp(logits)^2)``). Gradients are summed over ``micro_batches`` slices of the batch
(each slice takes every ``micro_batches``-th row, so every device keeps working on its own rows) and
normalised by the batch's total token count, so accumulation gives the gradient of the whole batch.

Optimizer: global-norm clipping, then AdamW with linear warmup and cosine decay; no weight decay on
normalisation weights. Master weights are ``model.param_dtype`` (float32); compute is ``model.dtype``.

LoRA (run config section ``lora``, :mod:`m1_jax.lora`): adapters are added to the model, the base weights
frozen (optionally with int8 experts: QLoRA); the step differentiates and the optimizer updates only the
adapters (:class:`m1_jax.lora.LoraParam`), so optimizer moments exist for them alone.

The train state is the state of ``(model, nnx.Optimizer)`` (parameters, optimizer moments, step). The step
is one ``jax.jit`` with explicit input and output shardings from :mod:`m1_jax.sharding` (parameters and
moments by the logical-axis rules, the batch split over ``data x fsdp x expert``). A non-finite loss or
gradient norm leaves the state unchanged (``ok`` is 0 in the metrics); the loop then stops or skips.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m1_jax import sharding
from m1_jax.config import M1Config
from m1_jax.flops import step_flops
from m1_jax.lora.adapters import LoraParam, add_adapters
from m1_jax.lora.spec import LoraConfig
from m1_jax.model import M1Model, init_model
from m1_jax.quant.weights import quantize_model
from m1_jax.run_config import OptimizerSection

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


# ----------------------------------------------------------------------------------- loss
def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 (cross entropy, logsumexp), each [batch, time]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked, lse


def loss_sums(model: M1Model, batch: dict, *, remat: str = "none") -> dict[str, jax.Array]:
    """Sums over the masked tokens of one (micro-)batch: ``ce``, ``z`` (logsumexp^2), ``tokens``; and
    the batch's mean-over-layers ``aux`` loss."""
    out = model.forward(batch["inputs"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                        remat=remat)
    ce, lse = token_losses(out.logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return {"ce": jnp.sum(ce * mask), "z": jnp.sum(jnp.square(lse) * mask), "tokens": jnp.sum(mask),
            "aux": out.aux_loss.astype(jnp.float32)}


# ----------------------------------------------------------------------------------- optimizer
def learning_rate_schedule(opt: OptimizerSection, steps: int) -> optax.Schedule:
    decay = opt.decay_steps or steps
    warmup = min(opt.warmup_steps, max(decay - 1, 0))
    return optax.warmup_cosine_decay_schedule(init_value=0.0 if warmup else opt.lr, peak_value=opt.lr,
                                              warmup_steps=warmup, decay_steps=max(decay, warmup + 1),
                                              end_value=opt.lr * opt.min_lr_ratio)


def decay_mask(params) -> Any:
    """True for weights that take weight decay: everything except normalisation weights."""
    def keep(path, _):
        return not any("norm" in str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt: OptimizerSection, steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on the warmup + cosine schedule. The same settings give the same
    transformation object, so train states built twice share their compiled step."""
    return _make_optimizer(dataclasses.astuple(opt), steps)


@functools.lru_cache(maxsize=16)
def _make_optimizer(fields: tuple, steps: int) -> optax.GradientTransformation:
    opt = OptimizerSection(*fields)
    schedule = learning_rate_schedule(opt, steps)
    parts = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------------- flops
def flops_per_token(cfg: M1Config, seq_len: int) -> float:
    """Model training FLOPs per token of a ``seq_len`` row (forward + backward; :mod:`m1_jax.flops`)."""
    return step_flops(cfg, "train", batch=1, seq_len=seq_len, context=0) / seq_len


# Peak dense bf16 FLOP/s per device by ``device_kind`` (public spec sheets), for MFU.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100": 312e12}


def peak_flops(device, configured: float = 0.0) -> float | None:
    if configured > 0:
        return configured
    kind = getattr(device, "device_kind", "")
    for name, value in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(name):
            return value
    return None


# ----------------------------------------------------------------------------------- the step
@dataclasses.dataclass(frozen=True)
class StepOptions:
    micro_batches: int = 1
    remat: str = "none"
    z_loss: float = 0.0
    aux_coef: float = 0.0


def split_micro(batch: dict, m: int) -> dict:
    """[B, T] -> [m, B/m, T]; micro-batch i holds rows i, i+m, i+2m, ... (local to each data shard)."""
    def split(x):
        B = x.shape[0]
        if B % m:
            raise ValueError(f"data.micro_batches={m} does not divide the batch of {B} rows")
        return x.reshape((B // m, m) + x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def accumulate_grads(objective, params, batch: dict, micro_batches: int):
    """``objective(params, micro_batch) -> (value, sums)`` (``sums``: a pytree of float32 scalars) ->
    (gradient, sums), each summed over the ``micro_batches`` slices of ``batch`` (:func:`split_micro`; one
    slice: the whole batch). The objective normalises by the whole batch, so the sum is the batch's gradient."""
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if micro_batches == 1:
        (_, sums), grads = grad_fn(params, batch)
        return grads, sums

    def acc(carry, mb):
        (_, s), g = grad_fn(params, mb)
        return jax.tree.map(jnp.add, carry, (g, s)), None

    micro = split_micro(batch, micro_batches)
    zeros = jax.tree.map(jnp.zeros_like, params)
    zsums = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                         jax.eval_shape(lambda p, mb: grad_fn(p, mb)[0][1], params, jax.tree.map(lambda x: x[0], micro)))
    (grads, sums), _ = jax.lax.scan(acc, (zeros, zsums), micro)
    return grads, sums


def update_if(ok: jax.Array, graphdef, leaves: list, treedef, grads):
    """The ``(model, optimizer)`` state (its ``leaves`` and ``treedef``, flattened before any merge: the
    update mutates the variables) after ``optimizer.update(model, grads)`` where ``ok``, else unchanged.

    A cond rather than a select over every parameter and moment (which read both versions of all of them,
    and made XLA copy the moments to keep the old ones alive)."""
    def update(leaves):
        model, optimizer = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        optimizer.update(model, grads)
        return jax.tree.leaves(nnx.state((model, optimizer)))

    return jax.tree.unflatten(treedef, jax.lax.cond(ok, update, lambda leaves: leaves, leaves))


def train_step_fn(graphdef, opts: StepOptions, schedule: optax.Schedule):
    """The pure step ``(state, batch) -> (state, metrics)`` over the ``(model, optimizer)`` state."""

    def step(state, batch):
        old_leaves, treedef = jax.tree.flatten(state)  # before merge: the update mutates the variables
        model, optimizer = nnx.merge(graphdef, state)
        mgraph, params, rest = nnx.split(model, trainable(model), ...)
        total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        m = opts.micro_batches

        def objective(p, mb):
            sums = loss_sums(nnx.merge(mgraph, p, rest), mb, remat=opts.remat)
            obj = sums["ce"] / total + opts.aux_coef * sums["aux"] / m
            if opts.z_loss:
                obj = obj + opts.z_loss * sums["z"] / total
            return obj, sums

        grads, sums = accumulate_grads(objective, params, batch, m)
        if m > 1:
            sums = dict(sums, aux=sums["aux"] / m)
        grad_norm = optax.tree.norm(grads)
        loss = sums["ce"] / total
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(sums["aux"])
        lr = schedule(optimizer.step[...])

        new_state = update_if(ok, graphdef, old_leaves, treedef, grads)
        metrics = {"loss": loss, "aux_loss": sums["aux"], "z_loss": sums["z"] / total, "grad_norm": grad_norm,
                   "lr": lr, "tokens": sums["tokens"], "ok": ok.astype(jnp.int32)}
        return new_state, metrics

    return step


# XLA options for a fast compile (``train.fast_compile``): no backend optimisation passes.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def trainable(model: M1Model):
    """The parameters a train step updates: the LoRA adapters of a model that has them, else all."""
    return nnx.Param if model.lora is None else LoraParam


def model_and_optimizer(model: M1Model, tx: optax.GradientTransformation, mesh: Mesh) -> tuple[M1Model, nnx.Optimizer]:
    """A copy of ``model`` placed on ``mesh`` (the caller's model is left as it is) and its optimizer: what
    the train state holds. Works on an abstract model under ``nnx.eval_shape`` too (for AOT planning)."""
    sharding.check_mesh(model.cfg, mesh)
    model = nnx.merge(*nnx.split(model))
    model.mesh = mesh if mesh.size > 1 else None
    return model, nnx.Optimizer(model, tx, wrt=trainable(model))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token arrays [batch, length]: rows split over the mesh's batch axes."""
    return NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"), mesh))


def jit_train_step(graphdef: nnx.GraphDef, state_shardings, mesh: Mesh, opts: StepOptions,
                   schedule: optax.Schedule, compiler_options: dict | None = None):
    """The one compiled train step ``(state, batch) -> (state, metrics)``: ``m1 train`` runs it and
    ``m1 aot --mode train`` lowers it. The state is donated and keeps ``state_shardings``."""
    return jit_step(train_step_fn(graphdef, opts, schedule), state_shardings, batch_sharding(mesh), mesh,
                    compiler_options)


def jit_step(step, state_shardings, batch_shardings, mesh: Mesh, compiler_options: dict | None = None):
    """``jax.jit`` of a step ``(state, batch) -> (state, metrics)``: the state donated and kept on
    ``state_shardings``, the batch on ``batch_shardings``, the metrics replicated."""
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,),
                   compiler_options=compiler_options or None)


def placed_state(model: M1Model, tx: optax.GradientTransformation, mesh: Mesh):
    """(graphdef, state, state shardings) of :func:`model_and_optimizer`, the state placed on ``mesh``: new
    arrays (never the model's own, which the steps' donation of the state would delete), so the caller's
    model stays usable."""
    graphdef, state = nnx.split(model_and_optimizer(model, tx, mesh))
    shardings = sharding.state_shardings(state, mesh)
    return graphdef, jax.tree.map(lambda x, s: jax.device_put(x, s, may_alias=False), state, shardings), shardings


class PlacedModelState:
    """What a model-and-optimizer state placed on a mesh offers (``graphdef``, ``state``, ``state_shardings``
    set by the subclass): :class:`TrainState` and :class:`m1_jax.rl.update.PolicyState`."""

    graphdef: nnx.GraphDef
    state: Any
    state_shardings: Any

    def abstract_state(self):
        """ShapeDtypeStructs with this mesh's shardings (a checkpoint's restore target)."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            self.state, self.state_shardings)

    def model(self) -> M1Model:
        return nnx.merge(self.graphdef, self.state)[0]

    def params(self):
        return nnx.state(self.model(), nnx.Param)


class TrainState(PlacedModelState):
    """The model + optimizer placed on a mesh, and the compiled train step.

    ``model`` is an :class:`M1Model` (random or pretrained, float32 master weights; it is copied, not
    changed); ``mesh`` a :class:`jax.sharding.Mesh` from :func:`m1_jax.sharding.make_mesh` (a single
    device is a mesh too).
    """

    def __init__(self, model: M1Model, tx: optax.GradientTransformation, mesh: Mesh, opts: StepOptions,
                 schedule: optax.Schedule, compiler_options: dict | None = None):
        self.mesh = mesh
        self.cfg = model.cfg
        self.graphdef, self.state, self.state_shardings = placed_state(model, tx, mesh)
        self.opts = opts
        self.schedule = schedule
        self.batch_sharding = batch_sharding(mesh)
        self._step = jit_train_step(self.graphdef, self.state_shardings, mesh, opts, schedule, compiler_options)

    @property
    def step(self) -> int:
        return int(jax.device_get(nnx.merge(self.graphdef, self.state)[1].step[...]))

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays split over the mesh's batch axes."""
        sharding.check_batch(local["inputs"].shape[0] * jax.process_count(), self.mesh)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local[k], np.int32))
                for k in BATCH_KEYS if k in local}

    def train_step(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        self.state, metrics = self._step(self.state, batch)
        return metrics



def step_setup(cfg: M1Config, run) -> tuple[optax.GradientTransformation, StepOptions, optax.Schedule]:
    """(optimizer, step options, learning-rate schedule) of run config ``run``
    (:class:`m1_jax.run_config.RunConfig`): what :func:`build_train_state` and ``m1 aot`` use."""
    tx = make_optimizer(run.optimizer, run.train.steps)
    opts = StepOptions(micro_batches=run.data.micro_batches, remat=run.model.remat, z_loss=run.optimizer.z_loss,
                       aux_coef=cfg.router_aux_loss_coef)
    return tx, opts, learning_rate_schedule(run.optimizer, run.train.steps)


def model_options(run) -> dict:
    """:class:`M1Model` keyword arguments of run config ``run``'s model section (``head_dtype`` "auto":
    None, the compute dtype)."""
    m = run.model
    return dict(dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype), moe_impl=m.moe_impl,
                lightning_impl=m.lightning_impl, scan_layers=m.scan_layers,
                head_dtype=None if m.head_dtype == "auto" else jnp.dtype(m.head_dtype))


def build_train_state(cfg: M1Config, run, mesh: Mesh, *, model: M1Model | None = None,
                      compiler_options: dict | None = None) -> TrainState:
    """A :class:`TrainState` for run config ``run`` (:class:`m1_jax.run_config.RunConfig`).

    ``compiler_options`` go to XLA (e.g. ``{"xla_backend_optimization_level": 0}``: a several times
    faster compile, for tiny models where compile time dominates)."""
    if compiler_options is None and run.train.fast_compile:
        compiler_options = FAST_COMPILE
    if model is None:
        model = init_model(cfg, seed=run.model.seed, **model_options(run))
    model = with_lora(model, run)
    tx, opts, schedule = step_setup(cfg, run)
    return TrainState(model, tx, mesh, opts, schedule, compiler_options)


def lora_config(run) -> LoraConfig | None:
    """The adapters of run config ``run`` (its ``lora`` section), or None for full fine-tuning."""
    section = run.lora
    return LoraConfig(section.rank, section.alpha, section.targets) if section.rank else None


def with_lora(model: M1Model, run) -> M1Model:
    """``model`` with the LoRA adapters of run config ``run`` added in place (its experts quantized to int8
    first with ``lora.base=int8``); as it is without adapters."""
    lora = lora_config(run)
    if lora is None:
        return model
    if run.lora.base == "int8":
        quantize_model(model, "int8")
    return add_adapters(model, lora, nnx.Rngs(run.lora.seed))


def parameter_counts(ts: "TrainState") -> dict:
    """Trainable parameters and optimizer-state bytes of the train state ``ts``, beside those of full
    fine-tuning of the same model (every weight trained, AdamW's two moments in the parameter dtype)."""
    model, optimizer = nnx.merge(ts.graphdef, ts.state)
    size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    nbytes = lambda tree: sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
    base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoraParam)))
    base_params = sum(int(np.prod(x.shape)) for p, x in nnx.to_flat_state(base)
                      if not str(p[-1]).endswith("_scale"))
    param_bytes = model.embed_tokens[...].dtype.itemsize  # the parameter dtype (never quantized)
    return {"trainable": size(nnx.state(model, trainable(model))), "base_params": base_params,
            "optimizer_bytes": nbytes(nnx.state(optimizer, nnx.optimizer.OptState)),
            "full_trainable": base_params, "full_optimizer_bytes": 2 * base_params * param_bytes}


def mfu(tokens_per_s: float, cfg: M1Config, seq_len: int, n_devices: int, peak: float | None) -> float | None:
    if not peak:
        return None
    return tokens_per_s * flops_per_token(cfg, seq_len) / (peak * n_devices)


