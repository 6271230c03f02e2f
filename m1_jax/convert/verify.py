"""``m1 convert --verify``: every written tensor re-read and compared with the source, then logits.

Each source tensor is read again and converted piece by piece exactly as the writer does; the bytes
read back from the Orbax arrays must have the same CRC-32C as that conversion and as the one recorded
in the manifest at write time. For small models (at most :data:`LOGITS_MAX_PARAMS` parameters) the
logits of the source checkpoint (loaded at the converted dtype) and of the restored checkpoint must
agree to fp32 atol 1e-4 on random token ids.
"""

from __future__ import annotations

import os

import numpy as np
from tqdm.auto import tqdm

from m1_jax.checkpoint_io import manifest as mf
from m1_jax.checkpoint_io import orbax_layout as ow
from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.checkpoint_io.sources import open_source
from m1_jax.config import M1Config, param_counts
from m1_jax.convert.layout import plan_all, quantized_slots, slot_pieces, targets
from m1_jax.quant.spec import QuantConfig

LOGITS_MAX_PARAMS = 50_000_000
LOGITS_ATOL = 1e-4


class VerificationError(CheckpointError):
    """The written checkpoint differs from its source."""


def verify_conversion(src_path: str, dst: str, *, mesh=None, progress: bool = True) -> dict:
    """Checks ``dst`` against its source ``src_path``; returns what was compared (raises
    :class:`VerificationError` naming the first tensor that differs)."""
    cfg = M1Config.from_json(os.path.join(src_path, "config.json"))
    record = mf.read_record(dst)
    src = open_source(src_path)
    tgts = targets(cfg, record["dtype"], QuantConfig.from_dict(record.get("quantize")))
    jobs = plan_all(cfg, src, tgts)
    manifest = mf.Manifest(dst)
    state_dir = os.path.join(dst, mf.STATE_DIR)
    meta = ow.read_metadata(state_dir)
    arrays = {p: ow.open_array(state_dir, t.name, meta) for p, t in tgts.items()}
    for key, placements in tqdm(jobs, desc="verify", unit="tensor", disable=not progress):
        if key not in manifest.done:
            raise VerificationError(f"{dst}: '{key}' was never written")
        x = src.read(key)
        for pl, recorded in zip(placements, manifest.done[key]):
            want = got = 0
            t = tgts[pl.path]
            if t.contracted is None:
                pieces = [(pl.path, index, piece) for index, piece in slot_pieces(pl, x, t)]
            else:  # int8: each slot's values, then each slot's scales (the writer's order)
                slots = list(quantized_slots(pl, x, t))
                pieces = [(pl.path, slot, q) for slot, q, _ in slots] + [(t.scale, slot, s) for slot, _, s in slots]
            for path, index, piece in pieces:
                want = mf.checksum(piece, want)
                got = mf.checksum(arrays[path][index].read().result(), got)
            if not want == got == recorded:
                raise VerificationError(f"{dst}: '{key}' -> {'.'.join(map(str, pl.path))}{list(pl.slot)}: "
                                        f"checksum {got:08x} read back, {want:08x} from the source, "
                                        f"{recorded:08x} recorded")
    out = {"tensors_checked": len(jobs)}
    if param_counts(cfg)["total"] <= LOGITS_MAX_PARAMS:
        out["logits_max_abs_diff"] = _compare_logits(cfg, src, dst, record, mesh)
    return out


def _compare_logits(cfg: M1Config, src, dst: str, record: dict, mesh) -> float:
    # imported here: a conversion without the logits check runs without loading JAX
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m1_jax.loading import load_state, restore_model
    from m1_jax.model import abstract_model
    from m1_jax.quant.weights import quantize_model

    param_dtype = jnp.dtype(record["dtype"])
    abstract = abstract_model(cfg, param_dtype=param_dtype)
    buffers = load_state(cfg, src, abstract)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    device = jax.devices()[0]  # committed like the restored arrays, so one compilation serves both
    for p, var in flat:
        var.set_value(jax.device_put(buffers.pop(p), device))
    reference = nnx.merge(graphdef, nnx.from_flat_state(flat))
    stored = QuantConfig.from_dict(record.get("quantize"))
    if stored is not None:  # the source quantized on the device: the same int8 values and scales, bit for bit
        reference = quantize_model(reference, stored)
    restored = restore_model(dst, mesh=mesh, require_complete=False)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 19), dtype=np.int32))
    if mesh is None:  # one compilation serves both models
        forward = nnx.jit(lambda model, x: model(x))
        a, b = np.asarray(forward(reference, ids)), np.asarray(forward(restored, ids))
    else:
        a, b = np.asarray(reference(ids)), np.asarray(restored(ids))
    diff = float(np.max(np.abs(a - b)))
    if not diff <= LOGITS_ATOL:
        raise VerificationError(f"{dst}: logits differ from the source's by {diff:.3g} (> {LOGITS_ATOL})")
    return diff
