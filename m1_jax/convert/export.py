"""``m1 export``: a converted Orbax checkpoint, or a trained model (an ``m1 train`` checkpoint) -> Hugging
Face safetensors shards with the original names.

Streaming like the conversion: each checkpoint tensor (one slot of a stacked parameter) is read from
its Orbax array region, put back into PyTorch layout (:func:`m1_jax.checkpoint_io.keys.to_checkpoint_layout`)
and appended to the current shard, whose header was written first from the shapes alone. Shards are
written under temporary names and renamed; ``model.safetensors.index.json`` is written last. A converted
checkpoint is checked as it is read: its chunk files first (all there, at their sizes), then each
region's CRC-32C against the one its conversion recorded (:mod:`m1_jax.checkpoint_io.integrity`). A training
checkpoint exports the model's parameters of its train state, in their stored dtype.

A LoRA run's checkpoint (:mod:`m1_jax.lora`) exports with ``merge_lora``: each targeted weight slot is
written as ``W + A B * alpha / rank`` (float32 sum, in the weight's dtype; a QLoRA run's int8 experts
dequantized first and written in float32), or with ``lora_only`` (:func:`export_peft_adapter`) as a Hugging
Face PEFT adapter for transformers' ``MiniMaxForCausalLM``: ``adapter_config.json`` and
``adapter_model.safetensors`` with each projection's ``lora_A`` [rank, in] and ``lora_B`` [out, rank]. PEFT's
LoRA targets ``nn.Linear`` modules, and transformers' MiniMax experts are fused 3-d parameters
(``gate_up_proj``, ``down_proj``), so per-expert adapters have no PEFT form: a run with expert targets
exports with ``merge_lora`` only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from m1_jax.checkpoint_io import files, integrity
from m1_jax.checkpoint_io import keys as key_table
from m1_jax.checkpoint_io import manifest as mf
from m1_jax.checkpoint_io import orbax_layout as ow
from m1_jax.checkpoint_io.errors import CheckpointError, cause_line, is_disk_full
from m1_jax.checkpoint_io.locate import BYTE_TOKENIZER, CONVERTED, MODEL_ITEM, TRAINING, locate
from m1_jax.checkpoint_io.safetensors_io import DTYPE_NAMES, INDEX_NAME
from m1_jax.config import M1Config
from m1_jax.convert.layout import TOKENIZER_FILES
from m1_jax.convert.transpose import contiguous_into
from m1_jax.lora.spec import EXPERT_TARGETS, LORA_A, LORA_B, LoraConfig, from_run, merged
from m1_jax.quant.spec import SCALE_SUFFIX, dequantize

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"123"`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"shard size {text!r}: expected a size like 5GB or 500MB")
    unit = (m[2] or "").upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m[1]) * scale)


def _layer_of(key: str) -> int:
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return int(m[1]) if m else (-1 if key.startswith("model.embed_tokens") else 1 << 30)


def _shards(entries: list[tuple[str, tuple, np.dtype]], max_bytes: int) -> list[list]:
    shards, cur, size = [], [], 0
    for key, shape, dtype in entries:
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((key, shape, dtype))
        size += n
    if cur:
        shards.append(cur)
    return shards


def _header(entries) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype in entries:
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _source(ckpt: str):
    """``(cfg, state dir, _METADATA, {path: array name}, checksum regions or None, config.json text,
    tokenizer files, (LoRA config or None, "int8" for a QLoRA base or None))`` of an ``m1 convert`` output or
    an ``m1 train`` checkpoint."""
    src = locate(ckpt)
    lora = (None, None)
    if src.kind == CONVERTED:
        if (mf.check_loadable(src.directory) or {}).get("quantize"):
            raise CheckpointError(f"{ckpt}: its weights are stored in int8 (m1 convert --quantize int8); m1 export "
                                  "writes the full-precision weights of a conversion made without --quantize")
        cfg = src.config()
        names = integrity.param_names(cfg)
        meta = ow.read_metadata(src.state_dir)
        integrity.check_chunk_files(src.state_dir, names, meta)
        regions = integrity.recorded_regions(src.directory, cfg)
        with open(os.path.join(src.directory, "config.json")) as f:
            config_text = f.read()
        tokenizer_dir = src.directory
    elif src.kind == TRAINING:
        cfg = src.config()
        names = {p: ".".join((MODEL_ITEM, *map(str, p))) for p in key_table.param_layout(cfg)}
        meta, regions = ow.read_metadata(src.state_dir), None
        lora = from_run(src.meta.get("run"))
        config_text = json.dumps(src.meta["config"], indent=1)
        try:
            tokenizer_dir = None if src.tokenizer == BYTE_TOKENIZER else src.tokenizer
        except CheckpointError as e:  # the run's tokenizer has moved: the weights still export
            log.warning("%s; exporting without tokenizer files", str(e).removesuffix("; pass --tokenizer"))
            tokenizer_dir = None
    else:
        raise CheckpointError(f"{ckpt}: a Hugging Face checkpoint already; `m1 export` takes an `m1 convert` "
                              "output or an `m1 train` workdir")
    tok_files = {}
    if tokenizer_dir is not None and os.path.isfile(tokenizer_dir):  # a run's tokenizer.json itself
        tok_files["tokenizer.json"] = tokenizer_dir
    elif tokenizer_dir is not None:
        tok_files = {f: os.path.join(tokenizer_dir, f) for f in TOKENIZER_FILES
                     if os.path.isfile(os.path.join(tokenizer_dir, f))}
    return cfg, src.state_dir, meta, names, regions, config_text, tok_files, lora


def _open_arrays(state_dir: str, meta: dict, names: dict[tuple, str], cfg: M1Config) -> dict:
    tree = {".".join(k["key"] for k in v.get("key_metadata", [])) for v in meta["tree_metadata"].values()}
    arrays = {}
    for p, (shape, _) in key_table.param_layout(cfg).items():
        if names[p] not in tree:
            raise CheckpointError(f"{state_dir}: holds no parameter {names[p]} (not a checkpoint of this model)")
        try:
            arrays[p] = ow.open_array(state_dir, names[p], meta)
        except ValueError as e:
            raise CheckpointError(f"{state_dir}/{names[p]}: cannot be opened ({cause_line(e)})") from None
        if tuple(arrays[p].shape) != shape:
            raise CheckpointError(f"{state_dir}/{names[p]}: shape {list(arrays[p].shape)}, config.json gives "
                                  f"{list(shape)}")
    return arrays


def _check_lora(ckpt: str, lora, merge_lora: bool, lora_only: bool) -> None:
    if merge_lora and lora_only:
        raise ValueError("--merge-lora and --lora-only: pass one of them")
    if lora[0] is None and (merge_lora or lora_only):
        raise CheckpointError(f"{ckpt}: holds no LoRA adapters (not a checkpoint of `m1 train --lora`); leave out "
                              f"{'--merge-lora' if merge_lora else '--lora-only'}")
    if lora[0] is not None and not (merge_lora or lora_only):
        raise CheckpointError(f"{ckpt}: a LoRA run's checkpoint; pass --merge-lora (the full model with the adapters "
                              "merged) or --lora-only (a PEFT adapter)")


def _open_adapters(state_dir: str, meta: dict, names: dict[tuple, str], lora: LoraConfig) -> dict:
    """{weight path: (A array, B array)} of every adapter the checkpoint holds."""
    tree = {".".join(k["key"] for k in v.get("key_metadata", [])) for v in meta["tree_metadata"].values()}
    out = {}
    for p, name in names.items():
        if p[-1] not in lora.targets:
            continue
        a_name, b_name = name + LORA_A, name + LORA_B
        if a_name not in tree or b_name not in tree:
            raise CheckpointError(f"{state_dir}: holds no LoRA adapter {a_name} (the run config names target "
                                  f"{p[-1]})")
        out[p] = (ow.open_array(state_dir, a_name, meta), ow.open_array(state_dir, b_name, meta))
    return out


def _open_scales(state_dir: str, meta: dict, names: dict[tuple, str], arrays: dict) -> dict:
    """{weight path: scales array} of the int8 weights (a QLoRA run's experts)."""
    return {p: ow.open_array(state_dir, names[p] + SCALE_SUFFIX, meta) for p, a in arrays.items()
            if np.dtype(a.dtype.numpy_dtype) == np.int8}


def export(ckpt: str, dst: str, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
           merge_lora: bool = False, lora_only: bool = False) -> dict:
    """Writes ``dst`` (safetensors shards + index + config.json + tokenizer files) from ``ckpt``: an
    ``m1 convert`` output (every array checked against its recorded checksums as it is read) or an
    ``m1 train`` workdir (its latest step) or step directory.

    A LoRA run's checkpoint needs ``merge_lora`` (its adapters merged into the weights) or ``lora_only``
    (a PEFT adapter instead, :func:`export_peft_adapter`).

    ``dst`` must be new or empty; on any failure (a damaged checkpoint, a full disk) what this export
    wrote is removed again, so nothing half-written is left."""
    ckpt, dst = os.fspath(ckpt), os.fspath(dst)
    cfg, state_dir, meta, names, regions, config_text, tok_files, lora = _source(ckpt)
    _check_lora(ckpt, lora, merge_lora, lora_only)
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise CheckpointError(f"{dst}: exists and is not empty; choose a new export directory")
    if lora_only:
        return export_peft_adapter(cfg, state_dir, meta, names, lora[0], dst)
    arrays = _open_arrays(state_dir, meta, names, cfg)
    merge = None
    if merge_lora:
        adapters = _open_adapters(state_dir, meta, names, lora[0])
        merge = (adapters, _open_scales(state_dir, meta, names, arrays), lora[0])
    tracker = None if regions is None else integrity.ChecksumTracker(regions, cfg, state_dir, names)
    placements = {}
    entries = []
    for key, pl in key_table.canonical_keys(cfg):
        placements[key] = pl
        dtype = np.dtype(arrays[pl.path].dtype.numpy_dtype)
        entries.append((key, pl.hf_shape, np.dtype(np.float32) if dtype == np.int8 else dtype))
    order = {k: i for i, (k, _, _) in enumerate(entries)}
    entries.sort(key=lambda e: (_layer_of(e[0]), order[e[0]]))
    shards = _shards(entries, max_shard_bytes)
    total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, s, d in entries)
    created = not os.path.exists(dst)
    written: list[str] = []
    try:
        os.makedirs(dst, exist_ok=True)
        weight_map = _write_shards(dst, shards, placements, arrays, tracker, state_dir, names, written,
                                   total, progress, merge)
        if tracker is not None:
            tracker.finish()
        written.append(os.path.join(dst, "config.json"))
        files.write_atomic(written[-1], config_text)
        for fname, path in tok_files.items():
            written.append(os.path.join(dst, fname))
            shutil.copyfile(path, written[-1])
        written.append(os.path.join(dst, INDEX_NAME))
        files.write_json_atomic(written[-1], {"metadata": {"total_size": total}, "weight_map": weight_map})
    except BaseException as e:
        _remove(dst, written, created)
        if is_disk_full(e):
            raise CheckpointError(f"{dst}: no space left on the device; the export needs "
                                  f"{tqdm.format_sizeof(total, 'B', 1024)} there (what it wrote is removed again)"
                                  ) from None
        raise
    return {"tensors": len(entries), "bytes": total, "shards": len(shards), "dst": dst}


def _write_shards(dst, shards, placements, arrays, tracker, state_dir, names, written, total, progress,
                  merge=None) -> dict:
    """Writes the safetensors shards (each under a temporary name, renamed when whole); returns the
    weight map. ``written`` collects every path created (for the cleanup after a failure). ``merge``:
    (adapters, int8 scales, LoRA config) of a LoRA run, merged into their weights as they are written."""
    weight_map, n = {}, len(shards)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="export", disable=not progress,
              dynamic_ncols=True) as bar:
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp = os.path.join(dst, name + ".partial")
            written.append(tmp)
            with open(tmp, "wb") as f:
                f.write(_header(shard))
                for key, shape, dtype in shard:
                    pl = placements[key]
                    try:
                        value = arrays[pl.path][pl.slot].read().result()
                    except ValueError as e:  # TensorStore: a data file it cannot read
                        raise CheckpointError(f"{state_dir}/{names[pl.path]}{list(pl.slot)} ('{key}'): "
                                              f"unreadable ({cause_line(e)})") from None
                    if tracker is not None:
                        tracker.add(pl.path, pl.slot, value)
                    if merge is not None and (pl.path in merge[0] or pl.path in merge[1]):
                        value = _merged_slot(value, pl, *merge)
                    out = contiguous_into(key_table.to_checkpoint_layout(pl, value))
                    if out.shape != tuple(shape) or out.dtype != dtype:
                        raise CheckpointError(f"{key}: exported as {out.dtype}{list(out.shape)}, expected "
                                              f"{dtype}{list(shape)}")
                    f.write(out.reshape(-1).view(np.uint8).data)
                    weight_map[key] = name
                    bar.update(out.nbytes)
                f.flush()
                os.fsync(f.fileno())
            written.append(os.path.join(dst, name))
            os.replace(tmp, written[-1])
    return weight_map


def _merged_slot(value: np.ndarray, pl, adapters: dict, scales: dict, lora: LoraConfig) -> np.ndarray:
    """One weight slot with its adapter merged (a QLoRA int8 slot dequantized first, then float32)."""
    if pl.path in scales:
        value = dequantize(value, scales[pl.path][pl.slot].read().result(), 0, 1)
    if pl.path not in adapters:
        return value
    a, b = (x[pl.slot].read().result() for x in adapters[pl.path])
    return merged(value, a, b, lora.scale)


def export_peft_adapter(cfg: M1Config, state_dir: str, meta: dict, names: dict[tuple, str], lora: LoraConfig,
                        dst: str) -> dict:
    """Writes a LoRA run's adapters as a Hugging Face PEFT adapter for transformers' ``MiniMaxForCausalLM``
    into ``dst`` (new or empty): ``adapter_model.safetensors`` (``base_model.model.model.layers.L.self_attn.
    NAME.lora_A.weight`` [rank, in], ``...lora_B.weight`` [out, rank], float32) and ``adapter_config.json``
    (``r``, ``lora_alpha``, ``target_modules``). Per-expert adapters have no PEFT form (module docstring)."""
    experts = [t for t in lora.targets if t in EXPERT_TARGETS]
    if experts:
        raise CheckpointError(f"--lora-only: the run's adapters include the experts ({', '.join(experts)}), which "
                              "PEFT cannot express (transformers' MiniMax experts are fused 3-d parameters, not "
                              "nn.Linear modules); export with --merge-lora instead")
    adapters = _open_adapters(state_dir, meta, names, lora)
    tensors = {}
    for key, pl in key_table.canonical_keys(cfg):
        if pl.path not in adapters:
            continue
        a, b = (np.asarray(x[pl.slot].read().result(), np.float32) for x in adapters[pl.path])
        module = "base_model.model." + key.removesuffix(".weight")
        tensors[module + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, lora.rank).T)
        tensors[module + ".lora_B.weight"] = np.ascontiguousarray(b.reshape(lora.rank, -1).T)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
              "target_modules": list(lora.targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "base_model_name_or_path": None}
    created = not os.path.exists(dst)
    written = [os.path.join(dst, "adapter_model.safetensors"), os.path.join(dst, "adapter_config.json")]
    try:
        os.makedirs(dst, exist_ok=True)
        save_file(tensors, written[0] + ".partial", metadata={"format": "pt"})
        os.replace(written[0] + ".partial", written[0])
        files.write_json_atomic(written[1], config)
    except BaseException:
        _remove(dst, [written[0] + ".partial", *written], created)
        raise
    return {"tensors": len(tensors), "bytes": sum(t.nbytes for t in tensors.values()), "dst": dst,
            "targets": list(lora.targets)}


def _remove(dst: str, written: list[str], created: bool) -> None:
    """Removes what a failed export wrote (and ``dst`` itself when the export created it)."""
    for path in written:
        if os.path.exists(path):
            os.remove(path)
    if created and os.path.isdir(dst) and not os.listdir(dst):
        os.rmdir(dst)
