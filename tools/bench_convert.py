"""Benchmark of ``m1 convert``: peak RSS and throughput beside plain reads (``cat``) of the same files.

Each repeat times, one after the other: ``cat`` of the source files to /dev/null (the read speed),
``cat`` into one file in the output's file system followed by ``sync`` (the same bytes read and
written, unconverted), and ``m1 convert`` as a child process (Python start and imports included; it
returns after its final file-system sync, so the output is durable). The table shows medians.

Page cache: ``--cache cold`` (the default) syncs and evicts the source files from the page cache
(``posix_fadvise(DONTNEED)``, no root needed) before every timing, so each reads the source from the
device, as a conversion of the 912 GB release does: it fits in no host's cache. The interpreter and
its libraries stay cached, as they are for a user who has run Python before. ``--cache warm`` reads
the files once first and leaves them cached (then ``cat`` to /dev/null is a memory copy, faster than
any conversion that also writes).

    python tools/make_synthetic_checkpoint.py /tmp/m1_synth
    python tools/bench_convert.py /tmp/m1_synth [--dst /var/tmp/m1_bench_out] [--repeats 3] [--json out.json]

Acceptance: peak RSS <= 3 x the largest source tensor + 500 MB; throughput >= 40% of the read speed.
Every run writes a new folder under ``--dst``; all are deleted at the end (keep room for ``--repeats``
copies of the source and of the output).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)


def evict(files: list[str]) -> None:
    """Writes back dirty pages, then drops ``files`` from the page cache."""
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _timed(cmd, evict_files: list[str] | None, **kw) -> tuple[float, subprocess.CompletedProcess]:
    if evict_files:
        evict(evict_files)
    t = time.perf_counter()
    proc = subprocess.run(cmd, **kw)
    return time.perf_counter() - t, proc


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{name}, {os.cpu_count()} cores, {mem:.0f} GiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="checkpoint directory (e.g. from tools/make_synthetic_checkpoint.py)")
    p.add_argument("--dst", default="/var/tmp/m1_bench_out",
                   help="output folder (one subfolder per run, all deleted at the end)")
    p.add_argument("--cache", choices=("cold", "warm"), default="cold",
                   help="cold: evict the source files from the page cache before every timing; warm: keep them cached")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="passed to m1 convert --workers")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if os.path.exists(args.dst):
        p.error(f"--dst {args.dst} exists")

    from m1_jax.checkpoint_io.sources import open_source

    src = open_source(args.src)
    largest = max(src.info(k).nbytes for k in src.keys())
    files = sorted(glob.glob(os.path.join(args.src, "*.safetensors")) + glob.glob(os.path.join(args.src, "*.bin")))
    total = sum(os.path.getsize(f) for f in files)
    quoted = " ".join(f"'{f}'" for f in files)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    extra = ["--workers", str(args.workers)] if args.workers else []
    cold = files if args.cache == "cold" else None
    if not cold:
        subprocess.run(f"cat {quoted} > /dev/null", shell=True, check=True)

    runs = []
    os.makedirs(args.dst)
    try:
        # every run writes a new folder and all are deleted at the end: deleting thousands of chunk files
        # just before creating as many slows ext4's inode allocation (a cost no real conversion pays)
        for i in range(args.repeats):
            t_read, _ = _timed(f"cat {quoted} > /dev/null", cold, shell=True, check=True)
            copy = os.path.join(args.dst, f"copy{i}.bin")
            t_copy, _ = _timed(f"cat {quoted} > '{copy}' && sync", cold, shell=True, check=True)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            cmd = [sys.executable, "-m", "m1_jax.cli", "convert", args.src, os.path.join(args.dst, f"run{i}"),
                   "--no-progress", *extra]
            t_conv, proc = _timed(cmd, cold, env=env, cwd=REPO, capture_output=True, text=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if proc.returncode:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            runs.append({"read_s": t_read, "read_write_s": t_copy, "convert_s": t_conv,
                         "convert_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)})
    finally:
        shutil.rmtree(args.dst)
    # ru_maxrss of children: the largest child ever waited for (cat's is a few MB): the converter
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024

    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    mb = 1e6
    limit = 3 * largest + 500 * mb
    res = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cache": args.cache, "repeats": args.repeats, "workers": args.workers or "default",
        "source_bytes": total, "files": len(files), "tensors": len(src.keys()), "largest_tensor_bytes": largest,
        "runs": runs, **{f"median_{k}": v for k, v in med.items()},
        "read_MBps": total / med["read_s"] / mb, "read_write_MBps": total / med["read_write_s"] / mb,
        "convert_MBps": total / med["convert_s"] / mb,
        "convert_vs_read": med["read_s"] / med["convert_s"],
        "convert_vs_read_write": med["read_write_s"] / med["convert_s"],
        "peak_rss_bytes": peak, "rss_limit_bytes": limit,
        "rss_ok": peak <= limit, "throughput_ok": med["read_s"] / med["convert_s"] >= 0.4,
    }

    ratios = [r["read_s"] / r["convert_s"] for r in runs]  # each run's read and convert ran back to back
    res["convert_vs_read_each_run"] = ratios

    def spread(k):
        return f"[{min(r[k] for r in runs):.2f}-{max(r[k] for r in runs):.2f}]"

    rows = [
        ("source", f"{total / 1e9:.2f} GB in {len(files)} files, {len(src.keys())} tensors, "
                   f"largest {largest / mb:.0f} MB"),
        (f"cat > /dev/null ({args.cache})", f"{med['read_s']:.2f} s {spread('read_s')}  {res['read_MBps']:.0f} MB/s"),
        (f"cat > file + sync ({args.cache})",
         f"{med['read_write_s']:.2f} s {spread('read_write_s')}  {res['read_write_MBps']:.0f} MB/s"),
        (f"m1 convert ({args.cache}, incl. sync)",
         f"{med['convert_s']:.2f} s {spread('convert_s')}  {res['convert_MBps']:.0f} MB/s, "
         f"CPU {med['convert_cpu_s']:.1f} s"),
        ("convert / read speed", f"{res['convert_vs_read']:.1%}  (each run {min(ratios):.0%}-{max(ratios):.0%}; "
                                 f"target >= 40%: {'met' if res['throughput_ok'] else 'MISSED'})"),
        ("convert / read+write speed", f"{res['convert_vs_read_write']:.1%}"),
        ("peak RSS of m1 convert", f"{peak / mb:.0f} MB  (limit 3 x {largest / mb:.0f} + 500 = {limit / mb:.0f} MB: "
                                   f"{'met' if res['rss_ok'] else 'EXCEEDED'})"),
    ]
    print(f"machine: {res['machine']}   date: {res['date']}   repeats: {args.repeats} (median [min-max])")
    for name, value in rows:
        print(f"| {name:34s} | {value} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
