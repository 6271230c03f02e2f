"""Benchmark lightning attention implementations against causal softmax attention and flash-linear-attention.

For each implementation and sequence length: forward and forward+backward wall
time (jit, compiled ahead of time so compilation is excluded, then the median of a
few runs with block_until_ready) and the compiled program's temporary memory
(`compiled.memory_analysis().temp_size_in_bytes`: XLA's scratch for the whole
program, excluding arguments and outputs).

  python tools/bench_lightning.py                   # table + bench_lightning.json
  python tools/bench_lightning.py --lengths 1024,4096 --out /tmp/b.json

The softmax baseline is `jax.nn.dot_product_attention(..., is_causal=True)`, run
head by head (lax.map, each head rematerialised in the backward) so that its
[T, T] scores exist for one head at a time: at 16k tokens all 8 heads at once
would need 8 GiB of float32 scores per copy on this machine.

On an NVIDIA GPU "pallas" is the Pallas GPU (Triton) kernel, and three options compare it:

  python tools/bench_lightning.py --lengths 16384,65536 --heads 64 --dtype bfloat16 --blocks 256 \\
      --reference-max 0 --softmax-max 0 --fla --decode-batch 64 --warmup 2 --inner 10 --repeats 5

* --fla: flash-linear-attention's `chunk_simple_gla` (the same operation: per-head decay g_gamma = -slope,
  scale 1, final state returned) on the same inputs (shared through DLPack), timed the same way (wall time
  of --inner calls after a device sync), after checking that its outputs, final states and gradients agree
  with the Pallas kernel's;
* --variants: Pallas kernel variants swept at the longest length: the forward (the chunk scan, or
  "split-..." for the split forward: a state pass, then an output pass parallel over chunks), chunk / state
  tile / warps / pipeline stages, and the split forward's key tile / output tile / chunks per output program;
  each variant's time over fla's at that length is in the summary, and the fastest forward+backward one is
  used for the table;
* --decode-batch: one decode step of that batch (float32 state), xla and the Pallas kernel, timed as a
  jitted, unrolled loop of --decode-steps steps, with its memory traffic (the state read and written, q/k/v/o) as
  a bandwidth, against a device-to-device copy measured in the same run and --peak-tbps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# JAX shares the GPU with PyTorch (--fla): allocate on demand instead of taking 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.lightning import lightning_attention, lightning_decode_step, m1_slopes  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def softmax_attention(q, k, v):
    """Causal softmax attention, one head at a time ([B, T, H, D] in and out)."""

    @jax.checkpoint
    def one_head(x):
        qh, kh, vh = x  # [B, T, D]
        return jax.nn.dot_product_attention(qh[:, :, None], kh[:, :, None], vh[:, :, None], is_causal=True)[:, :, 0]

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v))
    return jnp.moveaxis(jax.lax.map(one_head, xs), 0, 2)


# --variants: the number parts, and the words that may come first (the forward)
KERNEL_KEYS = {"c": "chunk", "t": "value_tile", "w": "num_warps", "s": "num_stages", "k": "key_tile",
               "o": "out_tile", "n": "out_chunks"}
FORWARD_WORDS = {"scan": ("forward", "scan"), "split": ("forward", "split")}
SPLIT_ONLY = ("key_tile", "out_tile", "out_chunks")


def parse_variants(text: str, keys: dict[str, str],
                   words: dict[str, tuple[str, str]] | None = None) -> list[tuple[str, dict[str, int | str]]]:
    """"c64-t64-w4-s2,split-c64-n2" -> [("pallas c64-t64-w4-s2", {"chunk": 64, ...}),
    ("pallas split-c64-n2", {"forward": "split", "chunk": 64, "out_chunks": 2})] for keys {"c": "chunk", ...}
    and words {"split": ("forward", "split"), ...} (a word, if any, comes first)."""
    words = words or {}
    out = []
    for item in filter(None, text.split(",")):
        kw: dict[str, int | str] = {}
        parts = item.split("-")
        if parts[0] in words:
            name, value = words[parts.pop(0)]
            kw[name] = value
        for part in parts:
            if part[:1] not in keys or not part[1:].isdigit():
                first = f" after an optional {'/'.join(words)}" if words else ""
                raise ValueError(f"bad variant {item!r}: parts are {'/'.join(keys)} followed by a number{first}")
            kw[keys[part[:1]]] = int(part[1:])
        if kw.get("forward") != "split" and any(key in kw for key in SPLIT_ONLY):
            raise ValueError(f"bad variant {item!r}: k/o/n apply to the split forward only (split-...)")
        out.append((f"pallas {item}", kw))
    return out


def make_fns(impl, block, slopes, pallas_kw=None):
    if impl == "softmax":
        fwd = softmax_attention
    elif pallas_kw:
        from pallas_kernels.lightning.pallas_gpu import lightning_pallas_gpu

        def fwd(q, k, v):
            s0 = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)
            o, st = lightning_pallas_gpu(q, k, v, slopes, s0, None, block, **pallas_kw)
            return o.astype(q.dtype), st
    else:
        kw = dict(impl=impl.split("-")[0], block_size=block or 256)

        def fwd(q, k, v):
            return lightning_attention(q, k, v, slopes, **kw)

    def loss(q, k, v):
        out = fwd(q, k, v)
        leaves = jax.tree_util.tree_leaves(out)
        return sum(jnp.sum(x.astype(jnp.float32)) for x in leaves)

    return fwd, jax.grad(loss, argnums=(0, 1, 2))


def time_calls(call, sync, repeats, slow_s, inner=1, warmup=0):
    """Median seconds per call over `repeats` timings of `inner` back-to-back calls ended by `sync`."""
    for _ in range(warmup):
        sync(call())
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = call()
        sync(out)
        times.append((time.perf_counter() - t0) / inner)
        if i == 0 and times[0] > slow_s:
            break  # one run is enough for a slow configuration
    return statistics.median(times), len(times)


def time_compiled(fn, args, repeats, slow_s, inner=1, warmup=0):
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = int(mem.temp_size_in_bytes) if mem is not None else None
    sec, runs = time_calls(lambda: compiled(*args), jax.block_until_ready, repeats, slow_s, inner, warmup)
    return sec, runs, temp, compiled


@jax.jit
def _rel_err(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, computed on the device."""
    return float(_rel_err(a, b))


class Fla:
    """flash-linear-attention's chunk_simple_gla on the JAX arrays' memory (torch and fla imported here:
    only --fla needs them)."""

    def __init__(self, slopes):
        import torch
        from fla.ops.simple_gla import chunk_simple_gla

        self.torch, self.op = torch, chunk_simple_gla
        self.g_gamma = torch.from_dlpack(jnp.asarray(-slopes, jnp.float32)).clone()
        import fla

        self.version = getattr(fla, "__version__", "?")

    def inputs(self, q, k, v):
        jax.block_until_ready((q, k, v))
        return [self.torch.from_dlpack(x).detach().requires_grad_() for x in (q, k, v)]

    def fwd(self, q, k, v):
        with self.torch.no_grad():
            return self.op(q, k, v, g_gamma=self.g_gamma, scale=1.0, output_final_state=True)

    def fwd_bwd(self, q, k, v):
        for x in (q, k, v):
            x.grad = None
        o, ht = self.op(q, k, v, g_gamma=self.g_gamma, scale=1.0, output_final_state=True)
        (o.sum(dtype=self.torch.float32) + ht.sum()).backward()
        return q.grad, k.grad, v.grad

    def sync(self, _):
        self.torch.cuda.synchronize()

    def to_jax(self, x):
        self.torch.cuda.synchronize()
        return jnp.from_dlpack(x.detach().contiguous())


def agreement(fla, tq, ours_fwd, ours_grads):
    """Relative differences (max |ours - fla| / max |fla|) of o, the final state and dq, dk, dv."""
    o, ht = fla.fwd(*tq)
    grads = fla.fwd_bwd(*tq)
    theirs = [fla.to_jax(x) for x in (o, ht, *grads)]
    ours = [*ours_fwd, *ours_grads]
    return {name: rel_err(a, b) for name, a, b in zip(("o", "state", "dq", "dk", "dv"), ours, theirs)}


def copy_bandwidth(gib: float, repeats: int) -> float:
    """Bytes per second of a device-to-device elementwise copy (read + write counted)."""
    n = int(gib * 2**30) // 4
    x = jax.random.uniform(jax.random.key(1), (n,), jnp.float32)
    f = jax.jit(lambda x: x * 1.5 + 0.25).lower(x).compile()
    sec, _ = time_calls(lambda: f(x), jax.block_until_ready, repeats, 1e9, inner=10, warmup=2)
    return 2 * n * 4 / sec


def decode_rows(args, slopes_all, dtype, copy_bps):
    """Decode-step rows: xla and the Pallas kernel (and --decode-variants), bandwidth from bytes moved."""
    from pallas_kernels.lightning.pallas_gpu import decode_step_pallas_gpu

    b, h, d, steps = args.decode_batch, args.heads, args.head_dim, args.decode_steps
    keys = jax.random.split(jax.random.key(2), 4)
    state = jax.random.uniform(keys[0], (b, h, d, d), jnp.float32, -1, 1)
    q, k, v = (jax.random.uniform(kk, (b, h, d), jnp.float32, -1, 1).astype(dtype) for kk in keys[1:])
    slopes = slopes_all
    itemsize = jnp.dtype(dtype).itemsize
    moved = 2 * state.size * 4 + 4 * b * h * d * itemsize  # state in and out; q, k, v in; o out

    def looped(step):
        def run(state, q, k, v):
            def body(_, carry):
                st, acc = carry
                o, st = step(st, q, k, v)
                # each step's state and output materialised: XLA may not fuse consecutive steps into one pass
                return jax.lax.optimization_barrier((st, acc + o.astype(jnp.float32)))

            # unrolled: the steps run back to back, without a loop condition read between them
            return jax.lax.fori_loop(0, steps, body, (state, jnp.zeros(q.shape, jnp.float32)), unroll=True)

        return run

    impls = [("xla", lambda *a: lightning_decode_step(*a, slopes, impl="xla")),
             ("pallas", lambda *a: lightning_decode_step(*a, slopes, impl="pallas"))]
    for name, kw in parse_variants(args.decode_variants, {"t": "value_tile", "w": "num_warps"}):
        impls.append((name, lambda *a, kw=kw: decode_step_pallas_gpu(*a, slopes, **kw)))
    one = {}
    rows = []
    for name, step in impls:
        row = dict(impl=name, batch=b, heads=h, head_dim=d, steps=steps, bytes=moved)
        try:
            one[name] = jax.jit(step)(state, q, k, v)
            sec, row["runs"], _, _ = time_compiled(looped(step), (state, q, k, v), args.repeats, args.slow_s,
                                                   inner=1, warmup=args.warmup)
        except Exception as e:  # a variant the compiler rejects is reported, the others still run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            rows.append(row)
            print(f"decode {name:<22} failed: {row['error']}", flush=True)
            continue
        per = sec / steps
        row.update(step_s=per, tbps=moved / per / 1e12)
        if copy_bps:
            row["pct_copy"] = 100 * moved / per / copy_bps
        if args.peak_tbps:
            row["pct_peak"] = 100 * moved / per / (args.peak_tbps * 1e12)
        row["rel_err_vs_xla"] = max(rel_err(a, b_) for a, b_ in zip(one[name], one["xla"]))
        rows.append(row)
        pct = "".join(f"  {row[k]:5.1f}% of {lab}" for k, lab in (("pct_copy", "copy"), ("pct_peak", "peak"))
                      if k in row)
        print(f"decode {name:<22} batch {b}  {per * 1e6:9.1f} us/step  {row['tbps']:6.2f} TB/s{pct}  "
              f"rel diff vs xla {row['rel_err_vs_xla']:.1e}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_lightning.json")
    p.add_argument("--lengths", default="1024,4096,16384,65536")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="q, k, v dtype")
    p.add_argument("--blocks", default="128,256", help="xla block sizes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inner", type=int, default=1, help="calls per timed repeat (time per call reported)")
    p.add_argument("--warmup", type=int, default=0, help="untimed calls before timing")
    p.add_argument("--slow-s", type=float, default=8.0, help="a first run slower than this is not repeated")
    p.add_argument(
        "--reference-bwd-max",
        type=int,
        default=4096,
        help="longest length for the reference backward (it keeps every token's state)",
    )
    p.add_argument("--softmax-max", type=int, default=16384)
    p.add_argument("--reference-max", type=int, default=16384)
    p.add_argument(
        "--pallas-max", type=int, default=1024, help="longest length for the Pallas kernels in interpret mode"
    )
    p.add_argument("--fla", action="store_true", help="time flash-linear-attention's chunk_simple_gla beside")
    p.add_argument("--variants", default="",
                   help="Pallas GPU kernel variants to sweep, e.g. c64-t32-w4-s2,split-c64-t32-k64-o128-n1-w4-s2 "
                        "(c chunk, t state tile, w warps, s stages; split: k key tile, o output tile, "
                        "n chunks per output program)")
    p.add_argument("--decode-batch", type=int, default=0, help="time the decode step at this batch (0: no)")
    p.add_argument("--decode-steps", type=int, default=20, help="decode steps per timed loop")
    p.add_argument("--decode-variants", default="", help="Pallas decode variants, e.g. t32-w4,t128-w8")
    p.add_argument("--copy-gib", type=float, default=2.0, help="size of the copy measured for bandwidth")
    p.add_argument("--peak-tbps", type=float, default=0.0, help="the memory's datasheet bandwidth, TB/s")
    args = p.parse_args(argv)
    for flag in ("repeats", "inner", "batch", "heads", "head_dim", "decode_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    try:
        variants = parse_variants(args.variants, KERNEL_KEYS, FORWARD_WORDS)
        parse_variants(args.decode_variants, {"t": "value_tile", "w": "num_warps"})
    except ValueError as e:
        p.error(f"--variants / --decode-variants: {e}")

    lengths = [int(x) for x in args.lengths.split(",") if x]
    blocks = [int(x) for x in args.blocks.split(",") if x]
    b, h, d = args.batch, args.heads, args.head_dim
    dtype = DTYPES[args.dtype]
    slopes = jnp.asarray(m1_slopes(64, 0, 80)[np.linspace(0, 63, h).astype(int)])
    backend = jax.default_backend()
    compiled_pallas = backend in ("tpu", "gpu")
    pallas_name = "pallas" if compiled_pallas else "pallas-interpret"
    timing = dict(repeats=args.repeats, slow_s=args.slow_s, inner=args.inner, warmup=args.warmup)

    meta = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        jax=jax.__version__,
        backend=backend,
        device=str(jax.devices()[0]),
        device_kind=jax.devices()[0].device_kind,
        cpu=_cpu_model(),
        cpus=os.cpu_count(),
        loadavg_start=os.getloadavg(),
        batch=b,
        heads=h,
        head_dim=d,
        dtype=args.dtype,
        timing=f"median of {args.repeats} timings of {args.inner} calls after {args.warmup} warm-up calls",
        memory="compiled.memory_analysis().temp_size_in_bytes",
        command=" ".join(
            [os.path.basename(sys.executable), "tools/bench_lightning.py"]
            + (argv if argv is not None else sys.argv[1:])
        ),
    )
    fla = Fla(slopes) if args.fla else None
    if fla:
        meta["fla"] = fla.version
        meta["torch"] = fla.torch.__version__
    print(
        f"# {meta['cpu']} ({meta['cpus']} cpus), {meta['device_kind']}, jax {meta['jax']} on {backend}, "
        f"{args.dtype}, load {meta['loadavg_start'][0]:.1f}",
        flush=True,
    )
    unit, uname = (1e3, "ms") if backend == "gpu" else (1.0, "s")
    rng = np.random.default_rng(0)

    def inputs(t):
        if backend == "cpu":
            return tuple(jnp.asarray(rng.uniform(-1, 1, (b, t, h, d)), jnp.float32).astype(dtype) for _ in range(3))
        keys = jax.random.split(jax.random.key(t), 3)
        return tuple(jax.random.uniform(kk, (b, t, h, d), jnp.float32, -1, 1).astype(dtype) for kk in keys)

    best, best_name = {}, None
    sweep = []
    if variants:
        t = max(lengths)
        q, k, v = inputs(t)
        print(f"# Pallas variants at T={t} (scan or split forward; chunk c, state tile t, warps w, stages s; "
              "split: key tile k, output tile o, chunks per output program n)")
        width = max(len(name) for name, _ in variants)
        for name, kw in variants:
            fwd, grad = make_fns("pallas", 256, slopes, kw)
            row = dict(variant=name, T=t, **kw)
            try:
                row["fwd_s"] = time_compiled(fwd, (q, k, v), **timing)[0]
                row["fwdbwd_s"] = time_compiled(grad, (q, k, v), **timing)[0]
            except Exception as e:  # a variant the compiler rejects (e.g. out of shared memory) is reported
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            sweep.append(row)
            if "error" in row:
                print(f"{row['variant']:<{width}} failed: {row['error']}", flush=True)
            else:
                print(f"{row['variant']:<{width}} fwd {row['fwd_s'] * unit:9.3f} {uname}   fwd+bwd "
                      f"{row['fwdbwd_s'] * unit:9.3f} {uname}", flush=True)
        ok = [r for r in sweep if "error" not in r]
        if ok:
            best_name, best = next(v for v, r in zip(variants, sweep) if r is min(ok, key=lambda r: r["fwdbwd_s"]))
            print(f"# fastest fwd: {min(ok, key=lambda r: r['fwd_s'])['variant']}; fastest fwd+bwd: {best_name}",
                  flush=True)
        del q, k, v

    configs = (
        [("reference", None)]
        + [("xla", c) for c in blocks]
        + [(pallas_name, 256), ("softmax", None)]
        + ([("fla", None)] if fla else [])
    )
    hdr = (f"{'impl':<26}{'block':>6}{'T':>7}{'fwd ' + uname:>10}{'fwd MiB':>9}{'fwd+bwd ' + uname:>11}"
           f"{'f+b MiB':>9}  note")
    print(hdr)
    print("-" * len(hdr), flush=True)
    def measure(impl, block, row, notes, q, k, v, t, ours):
        if impl == "fla":
            tq = fla.inputs(q, k, v)
            if ours:
                row["agreement"] = agreement(fla, tq, *ours["out"])
                notes.append("rel diff vs pallas " + ", ".join(f"{n} {e:.1e}" for n, e in row["agreement"].items()))
            row["fwd_s"], row["fwd_runs"] = time_calls(lambda: fla.fwd(*tq), fla.sync, **timing)
            row["fwdbwd_s"], row["fwdbwd_runs"] = time_calls(lambda: fla.fwd_bwd(*tq), fla.sync, **timing)
            row["fwd_temp_bytes"] = row["fwdbwd_temp_bytes"] = None
            notes.append(f"flash-linear-attention {fla.version} chunk_simple_gla")
            del tq
        else:
            kw = best if impl == "pallas" and backend == "gpu" else None
            if kw:
                row["variant"] = best_name
                notes.append(best_name)
            fwd, grad = make_fns(impl, block, slopes, kw)
            row["fwd_s"], row["fwd_runs"], row["fwd_temp_bytes"], cf = time_compiled(fwd, (q, k, v), **timing)
            if impl == "reference" and t > args.reference_bwd_max:
                notes.append("bwd skipped (stores every token's state)")
                row["fwdbwd_s"] = row["fwdbwd_temp_bytes"] = None
            else:
                row["fwdbwd_s"], row["fwdbwd_runs"], row["fwdbwd_temp_bytes"], cg = time_compiled(
                    grad, (q, k, v), **timing
                )
                if impl == "pallas" and fla:
                    ours["out"] = (cf(q, k, v), cg(q, k, v))

    rows = []
    for t in lengths:
        q, k, v = inputs(t)
        ours = {}
        for impl, block in configs:
            notes, row = [], dict(impl=impl, block=block, T=t)
            limit = {
                "reference": args.reference_max,
                "softmax": args.softmax_max,
                "pallas-interpret": args.pallas_max,
            }.get(impl)
            if limit is not None and t > limit:
                continue
            try:
                measure(impl, block, row, notes, q, k, v, t, ours)
            except Exception as e:  # e.g. a kernel the compiler rejects: reported, the other rows still run
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                notes.append("failed: " + row["error"])
                row.setdefault("fwd_s", None)
                row.setdefault("fwdbwd_s", None)
                row.setdefault("fwd_temp_bytes", None)
                row.setdefault("fwdbwd_temp_bytes", None)
            if impl == "pallas-interpret":
                notes.append("interpret mode (CPU emulation, not a TPU figure)")
            if impl == "softmax":
                notes.append("jax.nn.dot_product_attention, head by head")
            row["note"] = "; ".join(notes)
            rows.append(row)

            def fmt(x, scale=1.0, spec="10.3f"):
                return format(x / scale, spec) if x is not None else format("-", ">" + spec.split(".")[0])

            print(
                f"{impl:<26}{block or '':>6}{t:>7}{fmt(row['fwd_s'], 1 / unit)}"
                f"{fmt(row['fwd_temp_bytes'], 2**20, '9.1f')}{fmt(row['fwdbwd_s'], 1 / unit, '11.3f')}"
                f"{fmt(row['fwdbwd_temp_bytes'], 2**20, '9.1f')}  {row['note']}",
                flush=True,
            )
        del q, k, v, ours

    decode = []
    if args.decode_batch:
        copy_bps = copy_bandwidth(args.copy_gib, args.repeats) if backend != "cpu" else None
        if copy_bps:
            meta["copy_tbps"] = copy_bps / 1e12
            print(f"# device-to-device copy: {copy_bps / 1e12:.2f} TB/s (read + write)", flush=True)
        decode = decode_rows(args, slopes, dtype, copy_bps)

    meta["loadavg_end"] = os.getloadavg()
    summary = {}
    by = {(r["impl"], r["block"], r["T"]): r for r in rows}
    for blk in blocks:
        a, z = by.get(("xla", blk, 4096)), by.get(("xla", blk, 16384))
        sm = by.get(("softmax", None, 16384))
        if a and z:
            summary[f"xla{blk}_16k_over_4k_fwd"] = z["fwd_s"] / a["fwd_s"]
            summary[f"xla{blk}_16k_over_4k_fwdbwd"] = z["fwdbwd_s"] / a["fwdbwd_s"]
        if z and sm:
            summary[f"softmax_over_xla{blk}_16k_fwd"] = sm["fwd_s"] / z["fwd_s"]
            summary[f"softmax_over_xla{blk}_16k_fwdbwd"] = sm["fwdbwd_s"] / z["fwdbwd_s"]
    for t in lengths:
        ours, theirs = by.get((pallas_name, 256, t)), by.get(("fla", None, t))
        if ours and theirs:
            summary[f"pallas_over_fla_{t}_fwd"] = ours["fwd_s"] / theirs["fwd_s"]
            summary[f"pallas_over_fla_{t}_fwdbwd"] = ours["fwdbwd_s"] / theirs["fwdbwd_s"]
    for row in sweep:  # every variant against fla at the sweep's length
        theirs = by.get(("fla", None, row["T"]))
        if "error" not in row and theirs and theirs.get("fwd_s") and theirs.get("fwdbwd_s"):
            name = row["variant"].replace(" ", "_")
            row["over_fla_fwd"] = summary[f"{name}_over_fla_{row['T']}_fwd"] = row["fwd_s"] / theirs["fwd_s"]
            row["over_fla_fwdbwd"] = summary[f"{name}_over_fla_{row['T']}_fwdbwd"] = (
                row["fwdbwd_s"] / theirs["fwdbwd_s"])
    for key, val in summary.items():
        print(f"{key}: {val:.2f}")
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows, variants=sweep, decode=decode, summary=summary), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
