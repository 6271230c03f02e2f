"""Training benchmark on this machine: tokens/s and MFU of the tiny and a ~100M-parameter config, and the
compile time of the train step for an 80-layer versus an 8-layer scanned model.

MFU is model FLOPs (:func:`m1_jax.train.flops_per_token`) per second over the peak of one device; on
CPU there is no spec-sheet peak, so the peak is *measured* here as the float32 matmul throughput of a
2048^3 ``jnp.dot`` (MFU relative to what XLA reaches on a plain matmul on this CPU).

    JAX_PLATFORMS=cpu python tools/bench_train.py --out bench_train.json
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
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(a).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def batch(B: int, T: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, 512, (B, T)), "targets": rng.integers(0, 512, (B, T)),
            "loss_mask": np.ones((B, T), np.int32), "segment_ids": np.ones((B, T), np.int32),
            "positions": np.tile(np.arange(T), (B, 1))}


def throughput(cfg: M1Config, B: int, T: int, steps: int, peak: float, mesh_spec: str) -> dict:
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
    tps = B * T / dt
    return {"params": param_counts(cfg)["total"], "mesh": mesh_spec, "batch": B, "seq_len": T,
            "first_step_s": compile_s, "step_s": dt, "tokens_per_s": tps,
            "mfu": train.mfu(tps, cfg, T, mesh.size, peak)}


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
    args = p.parse_args()
    peak = matmul_peak()
    rows = [("tiny", throughput(resolve_config("tiny"), 16, 128, args.steps, peak, "data=1")),
            ("~100M", throughput(config_100m(), 4, 256, args.steps, peak, "data=1"))]
    c8, c80 = compile_time(deep(8)), compile_time(deep(80))
    print(f"jax {jax.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (1 device)\n")
    print("| config | params | mesh | batch x seq | first step (s, with compile) | step (s) | tokens/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {human(r['params'])} | {r['mesh']} | {r['batch']} x {r['seq_len']} | "
              f"{r['first_step_s']:.1f} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['mfu']:.1%} |")
    print(f"\ncompile time of the train step (scanned layers): 8 layers {c8:.1f} s, 80 layers {c80:.1f} s "
          f"(ratio {c80 / c8:.2f})")
    with open(args.out, "w") as f:
        json.dump({"jax": jax.__version__, "peak_flops": peak, "throughput": dict(rows),
                   "compile_s": {"8_layers": c8, "80_layers": c80}}, f, indent=2)


if __name__ == "__main__":
    main()
