"""Benchmark lightning attention implementations against causal softmax attention.

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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.lightning import lightning_attention, m1_slopes  # noqa: E402


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


def make_fns(impl, block, slopes):
    if impl == "softmax":
        fwd = softmax_attention
    else:
        kw = dict(impl=impl.split("-")[0], block_size=block or 256)

        def fwd(q, k, v):
            return lightning_attention(q, k, v, slopes, **kw)

    def loss(q, k, v):
        out = fwd(q, k, v)
        leaves = jax.tree_util.tree_leaves(out)
        return sum(jnp.sum(x.astype(jnp.float32)) for x in leaves)

    return fwd, jax.grad(loss, argnums=(0, 1, 2))


def time_compiled(fn, args, repeats, slow_s):
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = int(mem.temp_size_in_bytes) if mem is not None else None
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
        if i == 0 and times[0] > slow_s:
            break  # one run is enough for a slow configuration
    return statistics.median(times), len(times), temp


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_lightning.json")
    p.add_argument("--lengths", default="1024,4096,16384,65536")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--blocks", default="128,256", help="xla block sizes")
    p.add_argument("--repeats", type=int, default=3)
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
        "--pallas-max", type=int, default=1024, help="longest length for the Pallas kernels (interpret mode off TPU)"
    )
    args = p.parse_args(argv)

    lengths = [int(x) for x in args.lengths.split(",") if x]
    blocks = [int(x) for x in args.blocks.split(",") if x]
    b, h, d = args.batch, args.heads, args.head_dim
    slopes = jnp.asarray(m1_slopes(64, 0, 80)[np.linspace(0, 63, h).astype(int)])
    on_tpu = jax.default_backend() == "tpu"
    configs = (
        [("reference", None)]
        + [("xla", c) for c in blocks]
        + [("pallas" if on_tpu else "pallas-interpret", 256), ("softmax", None)]
    )

    meta = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        jax=jax.__version__,
        backend=jax.default_backend(),
        device=str(jax.devices()[0]),
        cpu=_cpu_model(),
        cpus=os.cpu_count(),
        loadavg_start=os.getloadavg(),
        batch=b,
        heads=h,
        head_dim=d,
        dtype="float32",
        memory="compiled.memory_analysis().temp_size_in_bytes",
        command=" ".join(
            [os.path.basename(sys.executable), "tools/bench_lightning.py"]
            + (argv if argv is not None else sys.argv[1:])
        ),
    )
    print(
        f"# {meta['cpu']} ({meta['cpus']} cpus), jax {meta['jax']} on {meta['backend']}, "
        f"load {meta['loadavg_start'][0]:.1f}",
        flush=True,
    )
    hdr = f"{'impl':<18}{'block':>6}{'T':>7}{'fwd s':>10}{'fwd MiB':>9}{'fwd+bwd s':>11}{'f+b MiB':>9}  note"
    print(hdr)
    print("-" * len(hdr), flush=True)
    rows = []
    rng = np.random.default_rng(0)
    for t in lengths:
        q, k, v = (jnp.asarray(rng.uniform(-1, 1, (b, t, h, d)), jnp.float32) for _ in range(3))
        for impl, block in configs:
            notes, row = [], dict(impl=impl, block=block, T=t)
            limit = {
                "reference": args.reference_max,
                "softmax": args.softmax_max,
                "pallas-interpret": args.pallas_max,
            }.get(impl)
            if limit is not None and t > limit:
                continue
            fwd, grad = make_fns(impl, block, slopes)
            row["fwd_s"], row["fwd_runs"], row["fwd_temp_bytes"] = time_compiled(
                fwd, (q, k, v), args.repeats, args.slow_s
            )
            if impl == "reference" and t > args.reference_bwd_max:
                notes.append("bwd skipped (stores every token's state)")
                row["fwdbwd_s"] = row["fwdbwd_temp_bytes"] = None
            else:
                row["fwdbwd_s"], row["fwdbwd_runs"], row["fwdbwd_temp_bytes"] = time_compiled(
                    grad, (q, k, v), args.repeats, args.slow_s
                )
            if impl == "pallas-interpret":
                notes.append("interpret mode (CPU emulation, not a TPU figure)")
            if impl == "softmax":
                notes.append("jax.nn.dot_product_attention, head by head")
            row["note"] = "; ".join(notes)
            rows.append(row)

            def fmt(x, scale=1.0, spec="10.3f"):
                return format(x / scale, spec) if x is not None else format("-", ">" + spec.split(".")[0])

            print(
                f"{impl:<18}{block or '':>6}{t:>7}{fmt(row['fwd_s'])}"
                f"{fmt(row['fwd_temp_bytes'], 2**20, '9.1f')}{fmt(row['fwdbwd_s'], spec='11.3f')}"
                f"{fmt(row['fwdbwd_temp_bytes'], 2**20, '9.1f')}  {row['note']}",
                flush=True,
            )

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
    for key, val in summary.items():
        print(f"{key}: {val:.2f}")
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows, summary=summary), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
