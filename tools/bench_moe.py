"""The routed experts' grouped matmul on this machine: every form side by side in one run.

For each (tokens, experts) case, top-2 routing from a random router, hidden ``--hidden``, expert width
``--width``, float32, jitted, the best of ``--repeats`` runs after a warm-up:

* ``batched einsum``: the same FLOPs as one batched matmul with equal groups (``[E, n, D] x [E, D, I]``,
  the SwiGLU of every group): the throughput a grouped matmul is measured against;
* ``ragged_dot`` and ``chunked``: the two grouped forms of :mod:`m1_jax.layers.experts` on the same
  expert-sorted rows (``swiglu_grouped``);
* ``experts ...``: the whole routed-experts step of one device (sort by expert, grouped matmul, weighted
  combine: ``experts_grouped``) and the dense reference (every expert on every token: ``experts_dense``);
* with ``--backward``: the forward + backward of the grouped forms and of the batched einsum.

GFLOP/s count the useful FLOPs (tokens x top-2 x 3 matmuls); ``vs einsum`` is the ratio of throughputs.

  python tools/bench_moe.py                                  # 4,096 tokens, 8 and 32 experts
  python tools/bench_moe.py --tokens 2048 --experts 8 --backward
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from m1_jax.layers.experts import experts_dense, experts_grouped, sort_by_expert, swiglu_grouped  # noqa: E402

TOP_K = 2


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def best_time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def swiglu_batched(xb, w1, w3, w2):
    h = jax.nn.silu(jnp.einsum("end,edi->eni", xb, w1)) * jnp.einsum("end,edi->eni", xb, w3)
    return jnp.einsum("eni,eid->end", h, w2)


def grouped_swiglu(counts, rows, w1, w3, w2, *, impl):
    return swiglu_grouped(rows, counts, w1, w3, w2, jnp.float32, impl)


def with_backward(fn, n_args: int):
    """fn -> a function returning the gradients of sum(sin(fn)) with respect to its first ``n_args``."""
    return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(n_args)))


def case(tokens: int, experts: int, hidden: int, width: int, repeats: int, backward: bool) -> list[tuple]:
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (tokens, hidden))
    w1 = jax.random.normal(k[1], (experts, hidden, width)) * 0.02
    w3 = jax.random.normal(k[2], (experts, hidden, width)) * 0.02
    w2 = jax.random.normal(k[3], (experts, width, hidden)) * 0.02
    probs = jax.nn.softmax(jax.random.normal(k[4], (tokens, experts)), axis=-1)
    weights, routed = jax.lax.top_k(probs, TOP_K)
    flops = tokens * TOP_K * 3 * 2 * hidden * width
    rows, counts, _ = jax.jit(lambda x, e: sort_by_expert(x, e, experts, jnp.float32))(x, routed)
    xb = jnp.ones((experts, tokens * TOP_K // experts, hidden))
    grouped = {impl: functools.partial(grouped_swiglu, counts, impl=impl) for impl in ("ragged", "chunked")}
    runs = [("batched einsum (same FLOPs)", swiglu_batched, (xb, w1, w3, w2)),
            ("grouped: ragged_dot", grouped["ragged"], (rows, w1, w3, w2)),
            ("grouped: chunked", grouped["chunked"], (rows, w1, w3, w2)),
            ("experts, chunked (sort + combine)",
             lambda *a: experts_grouped(*a, jnp.float32, "chunked"), (x, weights, routed, w1, w3, w2)),
            ("experts, dense reference", lambda *a: experts_dense(*a, jnp.float32), (x, weights, routed, w1, w3, w2))]
    if backward:
        runs += [("fwd+bwd: batched einsum", with_backward(swiglu_batched, 4), (xb, w1, w3, w2)),
                 ("fwd+bwd: ragged_dot", with_backward(grouped["ragged"], 4), (rows, w1, w3, w2)),
                 ("fwd+bwd: chunked", with_backward(grouped["chunked"], 4), (rows, w1, w3, w2))]
    out = []
    for name, fn, args in runs:
        t = best_time(jax.jit(fn), args, repeats)
        mult = 3 if name.startswith("fwd+bwd") else 1
        out.append((name, t, mult * flops / t / 1e9))
        print(f"  {tokens} tokens, {experts} experts, {name}: {t * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return out


def _figure(v: float) -> str:
    """Three significant figures below 100 (tiny shapes run in microseconds), one decimal above."""
    return f"{v:.1f}" if v >= 100 else f"{v:.3g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096], help="tokens per case (default 4096)")
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32], help="experts per case (default 8 32)")
    ap.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    ap.add_argument("--width", type=int, default=1024, help="expert width (default 1024)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs, the best reported (default 3)")
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    args = ap.parse_args(argv)
    for flag in ("hidden", "width", "repeats"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if min(args.tokens) < 1 or min(args.experts) < TOP_K:
        ap.error(f"--tokens must be positive and --experts at least {TOP_K}")
    print(f"{cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__} ({jax.default_backend()}); "
          f"{time.strftime('%Y-%m-%d', time.gmtime())}; hidden {args.hidden}, expert width {args.width}, top-{TOP_K}, "
          "float32\n")
    print("| tokens | experts | form | ms | GFLOP/s | vs einsum |")
    print("|---:|---:|---|---:|---:|---:|")
    for tokens in args.tokens:
        for experts in args.experts:
            rows = case(tokens, experts, args.hidden, args.width, args.repeats, args.backward)
            ref = {False: rows[0][2], True: next((r[2] for r in rows if r[0] == "fwd+bwd: batched einsum"), None)}
            for name, t, gflops in rows:
                base = ref[name.startswith("fwd+bwd")]
                print(f"| {tokens:,} | {experts} | {name} | {_figure(t * 1e3)} | {_figure(gflops)} | "
                      f"{gflops / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
