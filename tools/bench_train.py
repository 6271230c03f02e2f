"""Training benchmark on this machine: tokens/s and MFU of the tiny and a ~100M-parameter config, and the
compile time of the train step for an 80-layer versus an 8-layer scanned model.

MFU is model FLOPs (:func:`m1_jax.train.flops_per_token`) per second over the peak of one device; on
CPU there is no spec-sheet peak, so the peak is *measured* in the same run: the float32 throughput of a
2048^3 ``jnp.dot`` (best of 5), taken before and after the timed steps, the higher of the two (MFU
relative to what XLA reaches on a plain matmul on this CPU, at the time of the steps it divides).

    JAX_PLATFORMS=cpu python tools/bench_train.py --out bench_train.json
    JAX_PLATFORMS=cpu python tools/bench_train.py --no-compile-time   # throughput only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from m1_jax import sharding, train  # noqa: E402
from m1_jax.config import M1Config, human, m1_layer_types, param_counts  # noqa: E402
from m1_jax.presets import resolve_config  # noqa: E402
from m1_jax.run_config import RunConfig  # noqa: E402


def config_100m() -> M1Config:
    """8 layers (7 lightning + 1 softmax), hidden 512, 8 experts of 1024 (top-2): ~110M parameters."""
    return M1Config(vocab_size=512, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=64, intermediate_size=1024, num_local_experts=8,
                    num_experts_per_tok=2, layer_types=m1_layer_types(8), rotary_dim=32, block_size=64)


def deep(layers: int) -> M1Config:
    """A narrow model with M1's period of 8 repeated layers/8 times (for compile time)."""
    return M1Config(vocab_size=512, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, intermediate_size=64, num_local_experts=4,
                    num_experts_per_tok=2, layer_types=m1_layer_types(layers), rotary_dim=8, block_size=16)


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of the fastest of ``reps`` float32 ``n^3`` matmuls."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def batch(B: int, T: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, 512, (B, T)), "targets": rng.integers(0, 512, (B, T)),
            "loss_mask": np.ones((B, T), np.int32), "segment_ids": np.ones((B, T), np.int32),
            "positions": np.tile(np.arange(T), (B, 1))}


def throughput(cfg: M1Config, B: int, T: int, steps: int, mesh_spec: str) -> dict:
    run = RunConfig()
    run.data.batch_size, run.data.seq_len = B, T
    mesh = sharding.make_mesh(mesh_spec, jax.devices()[:1] if mesh_spec == "data=1" else None)
    ts = train.build_train_state(cfg, run, mesh)
    gb = ts.global_batch(batch(B, T))
    t = time.perf_counter()
    jax.block_until_ready(ts.train_step(gb))
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        m = ts.train_step(gb)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t) / steps
    return {"params": param_counts(cfg)["total"], "mesh": mesh_spec, "batch": B, "seq_len": T,
            "first_step_s": compile_s, "step_s": dt, "tokens_per_s": B * T / dt, "cfg": cfg, "devices": mesh.size}


def compile_time(cfg: M1Config, B: int = 2, T: int = 32) -> float:
    run = RunConfig()
    ts = train.build_train_state(cfg, run, sharding.make_mesh("data=1", jax.devices()[:1]))
    gb = ts.global_batch(batch(B, T))
    t = time.perf_counter()
    ts._step.lower(ts.state, gb).compile()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="bench_train.json")
    p.add_argument("--no-compile-time", action="store_true", help="skip the 8- vs 80-layer compile times")
    args = p.parse_args()
    peaks = [matmul_peak()]
    rows = [("tiny", throughput(resolve_config("tiny"), 16, 128, args.steps, "data=1")),
            ("~100M", throughput(config_100m(), 4, 256, args.steps, "data=1"))]
    peaks.append(matmul_peak())
    peak = max(peaks)
    for _, r in rows:
        r["mfu"] = train.mfu(r["tokens_per_s"], r.pop("cfg"), r["seq_len"], r.pop("devices"), peak)
    print(f"jax {jax.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"fp32 matmul peak measured in this run {peak / 1e9:.1f} GFLOP/s (before the steps "
          f"{peaks[0] / 1e9:.1f}, after {peaks[1] / 1e9:.1f}; 1 device)\n")
    print("| config | params | mesh | batch x seq | first step (s, with compile) | step (s) | tokens/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {human(r['params'])} | {r['mesh']} | {r['batch']} x {r['seq_len']} | "
              f"{r['first_step_s']:.1f} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['mfu']:.1%} |")
    result = {"jax": jax.__version__, "peak_flops": peak, "peak_flops_measured": peaks, "throughput": dict(rows)}
    if not args.no_compile_time:
        c8, c80 = compile_time(deep(8)), compile_time(deep(80))
        print(f"\ncompile time of the train step (scanned layers): 8 layers {c8:.1f} s, 80 layers {c80:.1f} s "
              f"(ratio {c80 / c8:.2f})")
        result["compile_s"] = {"8_layers": c8, "80_layers": c80}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
