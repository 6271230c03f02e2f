"""``from_pretrained``: a Hugging Face checkpoint directory, one written by ``m1 convert``, or a checkpoint
that ``m1 train`` saved -> a ready :class:`M1Model`.

Hugging Face tensors are read one at a time through the key table (:mod:`m1_jax.checkpoint_io.keys`)
into their slots of the stacked parameters; every slot must be filled exactly once. Weights keep their
stored dtype (bf16 stays bf16; router gates are float32) unless ``param_dtype`` says otherwise; ``dtype``
is the compute dtype.

A converted directory already holds the model's own state layout: Orbax restores it into the abstract
model (:func:`restore_model`); with a mesh, every parameter is read directly into its shards
(:mod:`m1_jax.sharding` rules), so no host holds a whole parameter. A training checkpoint holds the
train state of ``(model, optimizer)``: only the model's parameters are restored, the same way.

``quantize="int8"`` (:mod:`m1_jax.quant`): a directory converted with ``m1 convert --quantize int8`` is
restored as it is stored (int8 weights and their scales read straight into their shards); any other
checkpoint is loaded in its own dtype and each weight is then quantized on the devices, one at a time
(:func:`m1_jax.quant.weights.quantize_model`).
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
from m1_jax.checkpoint_io import integrity
from m1_jax.checkpoint_io import manifest as mf
from m1_jax.checkpoint_io import orbax_layout as ow
from m1_jax.checkpoint_io.errors import CheckpointError, cause_line, ignore_abandoned_reads
from m1_jax.checkpoint_io.locate import CONVERTED, MODEL_ITEM, TRAINING, Checkpoint, locate
from m1_jax.checkpoint_io.plan import plan_checkpoint
from m1_jax.checkpoint_io.safetensors_io import SafetensorsCheckpoint
from m1_jax.config import M1Config
from m1_jax.lora.spec import from_run as lora_from_run
from m1_jax.model import M1Model, abstract_model
from m1_jax.quant.spec import QuantConfig, QuantizeError
from m1_jax.quant.spec import resolve as resolve_quantize
from m1_jax.quant.weights import quantize_model

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


def _target(state: nnx.State, cfg: M1Config, mesh) -> nnx.State:
    """``state`` as ShapeDtypeStructs carrying the restore's target shardings: over ``mesh`` by the
    sharding rules (each device then reads only its shards), else on the first device."""
    if mesh is not None:
        sharding.check_mesh(cfg, mesh)
        shardings = sharding.state_shardings(state, mesh)
    else:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, state)
    return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings)


def _orbax_restore(state_dir: str, restore):
    """Runs ``restore()`` (an Orbax restore of ``state_dir``), its errors as one line naming the directory
    and the innermost cause (TensorStore names the file)."""
    ow.read_metadata(state_dir)  # a missing or damaged tree record is named before Orbax reads it
    ignore_abandoned_reads()  # a failed restore's reads still in flight report nothing useful
    try:
        return restore()
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many kinds for unreadable data
        raise CheckpointError(f"{state_dir}: cannot be restored ({cause_line(e)})") from None


def restore_state(path: str, cfg: M1Config, abstract: M1Model, mesh=None) -> nnx.State:
    """The abstract model's state filled from the converted directory's ``path/state`` (on ``mesh``
    when given: a :class:`jax.sharding.Mesh` or a spec, each device reading only its shards)."""
    target = _target(nnx.state(abstract), cfg, sharding.as_mesh(mesh))

    state_dir = os.path.abspath(os.path.join(path, mf.STATE_DIR))  # Orbax takes absolute paths only

    def restore():
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(state_dir, target)

    return _orbax_restore(state_dir, restore)


def restore_model(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None, mesh=None,
                  require_complete: bool = True, verify: bool = False, quantize=None, **model_kw) -> M1Model:
    """Loads a directory written by ``m1 convert``. ``param_dtype`` defaults to the converted dtype;
    ``require_complete=False`` also reads an unfinished conversion (``m1 convert --verify`` does, before
    the directory is marked complete).

    Every chunk file must be present at its size (a damaged one is named); ``verify`` also compares
    every array with the CRC-32C checksums the conversion recorded (reading the checkpoint once more).
    ``quantize``: see :func:`from_pretrained` (a directory stored in int8 is restored so whatever it says,
    unless it asks for other int8 weights than stored)."""
    path, mesh = os.fspath(path), sharding.as_mesh(mesh)
    record = mf.check_loadable(path) if require_complete else mf.read_record(path)
    stored = QuantConfig.from_dict(record.get("quantize"))
    quantize = resolve_quantize(quantize)
    if stored is not None and quantize is not None and quantize != stored:
        raise QuantizeError(f"{path}: its weights are stored in int8 as {stored}; quantize={quantize} asks for "
                            "other int8 weights (convert the source again with those options)")
    cfg = M1Config.from_json(os.path.join(path, "config.json"))
    state_dir = os.path.join(path, mf.STATE_DIR)
    meta = ow.read_metadata(state_dir)
    integrity.check_chunk_files(state_dir, integrity.param_names(cfg, stored), meta)
    if verify:
        integrity.check_checksums(path, cfg, meta)
    param_dtype = jnp.dtype(record["dtype"]) if param_dtype is None else param_dtype
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, quantize=stored, **model_kw)
    graphdef, _ = nnx.split(abstract)
    model = nnx.merge(graphdef, restore_state(path, cfg, abstract, mesh))
    if mesh is not None:
        model.mesh = mesh
    return model if stored is not None or quantize is None else quantize_model(model, quantize)


def restore_trained(ckpt: Checkpoint, *, dtype=jnp.float32, param_dtype=None, mesh=None, quantize=None,
                    **model_kw) -> M1Model:
    """The model of a training checkpoint (:func:`m1_jax.checkpoint_io.locate.locate`): only its
    parameters are read (Orbax partial restore of the train state's model subtree; the optimizer
    moments stay on disk), straight into their shardings on ``mesh`` when given.
    ``param_dtype`` defaults to the run's (``model.param_dtype``, float32 master weights)."""
    cfg = ckpt.config()
    if param_dtype is None:
        run_model = (ckpt.meta.get("run") or {}).get("model") or {}
        param_dtype = jnp.dtype(run_model.get("param_dtype", "float32"))
    mesh = sharding.as_mesh(mesh)
    lora, lora_base = lora_from_run(ckpt.meta.get("run"))  # a LoRA run: its adapters (and QLoRA's int8 base)
    if lora is not None:
        model_kw = dict(model_kw, lora=lora, quantize=lora_base)
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, **model_kw)
    graphdef, state = nnx.split(abstract)
    target = {MODEL_ITEM: nnx.to_pure_dict(_target(state, cfg, mesh))}

    def restore():
        with ocp.PyTreeCheckpointer() as ckptr:
            return ckptr.restore(os.path.abspath(ckpt.state_dir), args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))

    restored = _orbax_restore(ckpt.state_dir, restore)
    nnx.replace_by_pure_dict(state, restored[MODEL_ITEM])
    model = nnx.merge(graphdef, state)
    model.mesh = mesh
    return _quantized(model, quantize)


def _quantized(model: M1Model, quantize) -> M1Model:
    quantize = resolve_quantize(quantize)
    return model if quantize is None else quantize_model(model, quantize)


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None, progress: bool = False,
                    mesh=None, verify: bool = False, quantize=None, **model_kw) -> M1Model:
    """Loads a MiniMax-M1 checkpoint into an :class:`M1Model`: a Hugging Face directory (config.json +
    safetensors, single file or sharded, original or transformers-5 key names), a directory written by
    ``m1 convert`` (restored by Orbax, :func:`restore_model`), or a checkpoint that ``m1 train`` saved:
    the run's workdir (its latest step) or one step directory ``WORKDIR/checkpoints/N``
    (:func:`restore_trained`).

    ``dtype``: compute dtype (float32 logits either way). ``param_dtype``: storage dtype, default as
    stored in the checkpoint. ``mesh``: a :class:`jax.sharding.Mesh` or a spec such as
    ``"data=1,fsdp=2,expert=2,tensor=2"`` (:mod:`m1_jax.sharding`): each device then receives only its
    shards of every parameter and the model runs sharded. ``verify``: also check every array of an
    ``m1 convert`` output against the CRC-32C checksums its conversion recorded (the other kinds
    record none; every kind's files are checked for presence and size as they are read). Other
    keyword arguments go to :class:`M1Model` (``moe_impl``, ``head_dtype``: e.g.
    ``jnp.float32`` for a float32 output head on a bf16 model, ...).

    ``quantize``: ``"int8"`` (the experts' weights in int8, per output channel) or a
    :class:`m1_jax.quant.QuantConfig` (``QuantConfig(attention=True)``: the attention projections too);
    a bf16 / float32 checkpoint is quantized as it loads (module docstring), one converted with
    ``m1 convert --quantize int8`` is read in int8 (and is so without this argument too).
    """
    quantize = resolve_quantize(quantize)  # a bad value fails before anything is read
    found = locate(path)
    if found.kind == CONVERTED:  # an `m1 convert` output: Orbax restores it straight into the model's layout
        return restore_model(found.directory, dtype=dtype, param_dtype=param_dtype, mesh=mesh, verify=verify,
                             quantize=quantize, **model_kw)
    if found.kind == TRAINING:
        return restore_trained(found, dtype=dtype, param_dtype=param_dtype, mesh=mesh, quantize=quantize,
                               **model_kw)
    path = found.directory
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
    return _quantized(model, quantize)
