"""``m1 convert``: a Hugging Face / PyTorch checkpoint directory -> an Orbax checkpoint the model restores.

The output is the model's own NNX state layout (``nnx.state(abstract_model(cfg))``: stacked periods,
stacked experts, Flax ``[in, out]``) written as an Orbax PyTree checkpoint under ``DST/state``, with
``config.json``, the tokenizer files and the records of :mod:`m1_jax.checkpoint_io.manifest`.

Streaming: every source tensor is checked against the config from the headers alone before anything
is written; the parameter layout comes from the key table (:func:`m1_jax.checkpoint_io.keys.param_layout`),
so no JAX is loaded. Then worker threads convert tensors side by side in file order: each reads one
tensor (direct I/O into a reused, page-aligned buffer), changes its layout one chunk-sized piece at a
time (:mod:`m1_jax.convert.transpose`) and writes each piece as a chunk file of its slot
(:mod:`m1_jax.checkpoint_io.orbax_layout`). Host memory is bounded by
:class:`~m1_jax.checkpoint_io.buffers.BufferPool` (two of the largest tensors' buffers), whatever the depth
or the number of workers.

A full disk stops the conversion with one line saying so; what was written stays, and the same command
with ``--resume`` finishes the conversion once there is room. ``COMPLETE`` is written last, atomically.
"""

from __future__ import annotations

import collections
import gc
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm.auto import tqdm

from m1_jax.checkpoint_io import files
from m1_jax.checkpoint_io import keys as key_table
from m1_jax.checkpoint_io import manifest as mf
from m1_jax.checkpoint_io import orbax_layout as ow
from m1_jax.checkpoint_io.buffers import PAGE, BufferPool
from m1_jax.checkpoint_io.errors import CheckpointError, is_disk_full
from m1_jax.checkpoint_io.sources import open_source
from m1_jax.config import M1Config
from m1_jax.convert.layout import TOKENIZER_FILES, plan_all, quantized_slots, slot_pieces, targets
from m1_jax.convert.verify import verify_conversion
from m1_jax.quant.spec import resolve as resolve_quantize

log = logging.getLogger(__name__)

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
QUEUE_PER_WORKER = 2  # tensors submitted ahead per worker
READAHEAD_BYTES = 512 << 20  # source bytes hinted to the OS ahead of the conversion (page-cache reads)
STARTUP_READAHEAD_BYTES = 256 << 20  # read into the page cache while the plan is made


def piece_bytes(x_nbytes: int, itemsize: int, placements, tgts) -> int:
    """The largest converted piece of a source tensor (what :func:`write_tensor` needs besides the tensor)."""
    most = 0
    for pl in placements:
        t = tgts[pl.path]
        most = max(most, int(np.prod(t.chunks[len(pl.slot):], dtype=np.int64)) * itemsize)
    return min(most, x_nbytes)


def write_tensor(arrays, tgts, key: str, placements, x: np.ndarray, writer: ow.ChunkWriter,
                 out_for=None) -> list[int]:
    """Writes one source tensor into its slots; returns the CRC-32C of each placement's written bytes.

    A piece that is exactly one chunk (a whole slot row range) is written as the chunk file itself by
    ``writer``; any other region goes through a TensorStore write. ``out_for``: see :func:`slot_pieces`.
    """
    crcs = []
    for pl in placements:
        t, crc = tgts[pl.path], 0
        arr = arrays[pl.path]
        if t.contracted is not None:  # int8: the values of each slot, then its scales (one checksum over both)
            scales = []
            for slot, q, s in quantized_slots(pl, x, t):
                arr[slot].write(q).result()
                crc = mf.checksum(q, crc)
                scales.append((slot, s))
            for slot, s in scales:
                arrays[t.scale][slot].write(s).result()
                crc = mf.checksum(s, crc)
            crcs.append(crc)
            continue
        for index, piece in slot_pieces(pl, x, t, out_for):
            crc = mf.checksum(piece, crc)
            if len(pl.slot) == t.stack_dims and len(t.shape) > t.stack_dims:  # piece == one chunk
                coords = pl.slot + (index[-1].start // t.chunks[t.stack_dims],) + (0,) * (len(t.shape) - t.stack_dims - 1)
                writer.write_chunk(arr.kvstore.path, coords, piece.reshape((1,) * t.stack_dims + piece.shape),
                                   t.chunks)
            else:
                arr[index].write(piece).result()  # done before the piece's buffer is reused
        crcs.append(crc)
    return crcs


def default_workers() -> int:
    """Twice the cores (at least 4, at most 16): a worker spends much of its time waiting on the disk."""
    return min(16, max(4, 2 * (os.cpu_count() or 1)))


def resolve_dtype(name: str, cfg: M1Config, src) -> str:
    if name in DTYPES:
        return DTYPES[name]
    if name != "keep":
        raise CheckpointError(f"dtype {name!r}: expected bf16, fp32 or keep")
    for key in src.keys():
        if key.endswith("embed_tokens.weight"):
            pls = key_table.plan(cfg, key)
            if pls and pls[0].path == ("embed_tokens",):
                return np.dtype(src.info(key).dtype).name
    return "float32"


def prepare_destination(dst: str, record: dict, resume: bool) -> None:
    """Refuses a DST holding something else (another model, other options, unrelated files)."""
    if not os.path.exists(dst):
        os.makedirs(dst)
        return
    if not os.path.isdir(dst):
        raise CheckpointError(f"{dst}: exists and is not a directory")
    old = mf.read_record(dst)
    if old is None:
        if os.listdir(dst):
            raise CheckpointError(f"{dst}: not empty and not a conversion output; choose an empty or new DST")
        return
    diff = mf.differences(old, record)
    if diff:
        what = "a complete conversion" if mf.is_complete(dst) else "a partial conversion"
        raise CheckpointError(f"{dst}: holds {what} of another model or with other options "
                              f"({'; '.join(diff)}); delete it or choose another DST")
    if mf.is_complete(dst):
        raise CheckpointError(f"{dst}: already holds this complete conversion; delete it to convert again")
    if not resume:
        raise CheckpointError(f"{dst}: holds an unfinished conversion of this source; pass --resume to finish "
                              "it, or delete it")


def _write_all(src, arrays, tgts, todo, manifest, workers: int, bar, n_jobs: int) -> None:
    """Writes the tensors of ``todo`` with ``workers`` threads, recording each finished one in order.

    Threads overlap reading, layout copies, checksums and writes (numpy, the checksum and file I/O
    release the GIL). Each tensor runs in one buffer of the pool (source bytes, then its converted
    piece); the pool holds at most two of the largest such buffers, which bounds host memory whatever
    the number of workers (when ``--dtype`` changes the element type, each worker also holds one
    converted piece of at most ``CHUNK_BYTES``). Tensors are recorded in submission order, so after an interruption the
    manifest holds exactly the tensors before the first unfinished one.
    """
    def cost(key, placements):
        info = src.info(key)
        return info.nbytes + src.read_slack, piece_bytes(info.nbytes, info.dtype.itemsize, placements, tgts)

    costs = {k: cost(k, pls) for k, pls in todo}
    total = {k: -(-a // PAGE) * PAGE + b for k, (a, b) in costs.items()}  # pieces start page-aligned
    pool = BufferPool(2 * max(total.values(), default=0))
    writer = ow.ChunkWriter()

    def run(key, placements):
        n_src, n_piece = costs[key]
        with pool.take(total[key]) as buf:
            x = src.read_into(key, buf[:n_src])
            piece = buf[total[key] - n_piece:]

            def out_for(shape, dtype):
                return piece[: int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

            return write_tensor(arrays, tgts, key, placements, x, writer, out_for)

    queue = collections.deque()
    nbytes = [src.info(k).nbytes for k, _ in todo]
    submitted = hinted = hinted_bytes = done_bytes = 0

    def submit_next() -> None:
        nonlocal submitted, hinted, hinted_bytes
        if submitted < len(todo):
            key, placements = todo[submitted]
            queue.append((key, executor.submit(run, key, placements)))
            submitted += 1
        while hinted < len(todo) and (hinted < submitted or hinted_bytes - done_bytes < READAHEAD_BYTES):
            src.prefetch(todo[hinted][0])  # the device reads ahead while earlier tensors are converted
            hinted_bytes += nbytes[hinted]
            hinted += 1

    n_done = n_jobs - len(todo)
    with ThreadPoolExecutor(workers, thread_name_prefix="m1-convert") as executor:
        try:
            for _ in range(workers * QUEUE_PER_WORKER):
                submit_next()
            while queue:
                key, fut = queue.popleft()
                manifest.add(key, fut.result())
                done_bytes += src.info(key).nbytes
                n_done += 1
                bar.update(src.info(key).nbytes)
                bar.set_postfix_str(f"{n_done}/{n_jobs} tensors", refresh=False)
                submit_next()
        finally:
            for _, fut in queue:
                fut.cancel()


def convert(src_path: str, dst: str, *, dtype: str = "keep", resume: bool = False, verify: bool = False,
            mesh=None, progress: bool = True, workers: int | None = None, quantize=None) -> dict:
    """Converts ``src_path`` to ``dst``; returns a summary (tensors, bytes, dtype, verification).

    ``workers``: threads converting tensors side by side (default: :func:`default_workers`).
    ``quantize``: ``"int8"`` or a :class:`m1_jax.quant.QuantConfig`: the experts' weights (and the attention
    projections if it says so) written as int8 values and float32 per-output-channel scales
    (:mod:`m1_jax.quant`); each such weight is quantized whole, one expert at a time, so a worker holds
    one expert's weight in float32 besides its buffers.
    """
    qc = resolve_quantize(quantize)
    if workers is not None and workers < 1:
        raise CheckpointError(f"workers={workers}: expected a positive number of threads")
    src_path, dst = os.fspath(src_path), os.fspath(dst)
    cfg = M1Config.from_json(os.path.join(src_path, "config.json"))
    src = open_source(src_path, direct=True)
    src.readahead(STARTUP_READAHEAD_BYTES)  # the device reads while the plan is checked
    gc.freeze()  # the imported modules' objects: the collector need not scan them again and again
    dtype_name = resolve_dtype(dtype, cfg, src)
    tgts = targets(cfg, dtype_name, qc)
    jobs = plan_all(cfg, src, tgts)  # every bad input fails here, before DST is touched
    record = mf.make_record(cfg, src, src_path, dtype_name)
    if qc is not None:
        record["quantize"] = qc.to_dict()
    prepare_destination(dst, record, resume)
    try:
        return _convert_into(dst, src, src_path, cfg, tgts, jobs, record, verify=verify, mesh=mesh,
                             progress=progress, workers=workers or default_workers())
    except (OSError, ValueError) as e:
        if not is_disk_full(e):
            raise
        size = sum(int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize for t in tgts.values())
        raise CheckpointError(f"{dst}: no space left on the device (the conversion needs "
                              f"{tqdm.format_sizeof(size, 'B', 1024)} in all); free some, then run the same "
                              "command with --resume to finish it") from None


def _convert_into(dst: str, src, src_path: str, cfg: M1Config, tgts, jobs, record: dict, *, verify: bool, mesh,
                  progress: bool, workers: int) -> dict:
    """Writes the conversion into the prepared ``dst``, skipping the tensors its manifest records."""
    files.write_json_atomic(os.path.join(dst, mf.RECORD_FILE), record)
    shutil.copyfile(os.path.join(src_path, "config.json"), os.path.join(dst, "config.json"))
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src_path, name)):
            shutil.copyfile(os.path.join(src_path, name), os.path.join(dst, name))

    state_dir = os.path.join(dst, mf.STATE_DIR)
    os.makedirs(state_dir, exist_ok=True)
    arrays = {p: ow.create_array(state_dir, t.name, t.shape, t.dtype, t.chunks) for p, t in tgts.items()}
    manifest = mf.Manifest(dst)
    sizes = {k: src.info(k).nbytes for k, _ in jobs}
    todo = [(k, pls) for k, pls in jobs if k not in manifest.done]
    bar = tqdm(total=sum(sizes.values()), initial=sum(sizes.values()) - sum(sizes[k] for k, _ in todo), unit="B",
               unit_scale=True, unit_divisor=1024, desc="convert", disable=not progress, dynamic_ncols=True)
    failed = True
    try:
        _write_all(src, arrays, tgts, todo, manifest, workers, bar, len(jobs))
        failed = False
    finally:
        bar.close()
        manifest.close(failed=failed)  # records what finished; a second failure does not hide the first
    ow.write_metadata(state_dir, ow.param_entries({p: t.shape for p, t in tgts.items()}))
    summary = {"tensors": len(jobs), "bytes": sum(sizes.values()), "dtype": record["dtype"], "dst": dst}
    if "quantize" in record:
        summary["quantize"] = record["quantize"]
    if verify:
        summary["verify"] = verify_conversion(src_path, dst, mesh=mesh, progress=progress)
    mf.sync_filesystem(state_dir)
    mf.mark_complete(dst)
    return summary
