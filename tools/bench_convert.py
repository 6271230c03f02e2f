"""Benchmark of ``m1 convert``: peak RSS and throughput beside plain reads (``cat``) of the same files.

Page cache: the source files are read once with ``cat`` to warm the cache, then timed with ``cat``
(to /dev/null: the read speed) and with ``cat`` into a file in the output directory's file system
(read + write of the same bytes, no conversion), then ``m1 convert`` runs as a child process, all
warm. The child's wall time includes the final file-system sync (the checkpoint is durable when it
returns); its peak RSS comes from ``resource.getrusage(RUSAGE_CHILDREN)``.

    python tools/make_synthetic_checkpoint.py /tmp/m1_synth
    python tools/bench_convert.py /tmp/m1_synth --dst /tmp/m1_bench_out [--json out.json]

Acceptance: peak RSS <= 3 x the largest source tensor + 500 MB; throughput >= 40% of the read speed.
The output directory is deleted afterwards.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)


def _timed(cmd: str) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, shell=True, check=True)
    return time.perf_counter() - t


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    return f"{name}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="checkpoint directory (e.g. from tools/make_synthetic_checkpoint.py)")
    p.add_argument("--dst", default="/tmp/m1_bench_out", help="conversion output (deleted afterwards)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)

    from m1_jax.convert.convert import open_source

    src = open_source(args.src)
    largest = max(src.info(k).nbytes for k in src.keys())
    files = sorted(glob.glob(os.path.join(args.src, "*.safetensors")) + glob.glob(os.path.join(args.src, "*.bin")))
    total = sum(os.path.getsize(f) for f in files)
    quoted = " ".join(f"'{f}'" for f in files)
    if os.path.exists(args.dst):
        p.error(f"--dst {args.dst} exists")

    _timed(f"cat {quoted} > /dev/null")  # warm the page cache
    t_read = _timed(f"cat {quoted} > /dev/null")
    os.makedirs(args.dst)
    copy = os.path.join(args.dst, "copy.bin")
    t_copy = _timed(f"cat {quoted} > '{copy}' && sync")
    os.remove(copy)
    os.rmdir(args.dst)

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "m1_jax.cli", "convert", args.src, args.dst, "--no-progress"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    t_conv = time.perf_counter() - t
    if proc.returncode:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child: the converter
    shutil.rmtree(args.dst)

    mb = 1e6
    limit = 3 * largest + 500 * mb
    res = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "source_bytes": total, "files": len(files), "tensors": len(src.keys()), "largest_tensor_bytes": largest,
        "read_s": t_read, "read_MBps": total / t_read / mb,
        "read_write_s": t_copy, "read_write_MBps": total / t_copy / mb,
        "convert_s": t_conv, "convert_MBps": total / t_conv / mb,
        "convert_vs_read": t_read / t_conv, "convert_vs_read_write": t_copy / t_conv,
        "peak_rss_bytes": peak, "rss_limit_bytes": limit,
        "rss_ok": peak <= limit, "throughput_ok": t_read / t_conv >= 0.4,
    }
    rows = [
        ("source", f"{total / 1e9:.2f} GB in {len(files)} files, {len(src.keys())} tensors, "
                   f"largest {largest / mb:.0f} MB"),
        ("cat > /dev/null (warm)", f"{t_read:.2f} s  {res['read_MBps']:.0f} MB/s"),
        ("cat > file + sync (warm)", f"{t_copy:.2f} s  {res['read_write_MBps']:.0f} MB/s"),
        ("m1 convert (warm, incl. sync)", f"{t_conv:.2f} s  {res['convert_MBps']:.0f} MB/s"),
        ("convert / read speed", f"{res['convert_vs_read']:.1%}  (target >= 40%: "
                                 f"{'ok' if res['throughput_ok'] else 'MISSED'})"),
        ("convert / read+write speed", f"{res['convert_vs_read_write']:.1%}"),
        ("peak RSS of m1 convert", f"{peak / mb:.0f} MB  (limit 3 x {largest / mb:.0f} + 500 = {limit / mb:.0f} MB: "
                                   f"{'ok' if res['rss_ok'] else 'EXCEEDED'})"),
    ]
    print(f"machine: {res['machine']}   date: {res['date']}")
    for name, value in rows:
        print(f"| {name:32s} | {value} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
