"""``m1 aot``: compile a train / forward / decode step for a TPU topology on this host and report the
per-device memory, the HBM of the chip, FLOPs per step and compile time (see :mod:`m1_jax.aot`)."""

from __future__ import annotations

import json

import jax.numpy as jnp

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def add_arguments(p):
    p.add_argument("--config", required=True, help="config.json, checkpoint directory or preset (e.g. minimax-m1-40k)")
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:4x4x4, v5e:2x2, v6e:4x4")
    p.add_argument("--mesh", required=True, help="mesh over the topology's chips, e.g. fsdp=-1,expert=8 "
                                                 "(axes data, fsdp, expert, tensor; -1 = the rest)")
    p.add_argument("--mode", choices=("train", "forward", "decode", "prefill"), default="train",
                   help="prefill: one --seq-len chunk of a chunked prefill on a cache of --context tokens")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: data*fsdp*expert)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per row for train / forward; chunk length for prefill")
    p.add_argument("--context", type=int, default=1 << 20, help="KV cache length for decode / prefill")
    p.add_argument("--param-dtype", choices=DTYPES, default=None,
                   help="parameter storage dtype (default: float32 for train, bfloat16 otherwise)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="compute dtype")
    p.add_argument("--lightning-impl", choices=("auto", "xla", "pallas"), default="auto",
                   help="lightning attention: auto = the Pallas TPU kernels")
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"), default="none",
                   help="train: rematerialise each layer period in the backward pass (jax.checkpoint policy)")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON")


def run(args) -> int:
    from m1_jax import aot, sharding
    from m1_jax.presets import resolve_config

    cfg = resolve_config(args.config)
    batch = args.batch
    if batch is None:  # one row per data-parallel shard
        mesh = sharding.make_mesh(args.mesh, aot.topology_devices(args.topology))
        batch = sharding.axis_size(mesh, sharding.BATCH_AXES)
    param_dtype = DTYPES[args.param_dtype or ("float32" if args.mode == "train" else "bfloat16")]
    print(f"compiling {args.mode} for {args.topology} (mesh {args.mesh}) ...", flush=True)
    report = aot.plan(cfg, args.topology, args.mesh, args.mode, batch=batch, seq_len=args.seq_len,
                      context=args.context, param_dtype=param_dtype, dtype=DTYPES[args.dtype],
                      lightning_impl=args.lightning_impl, remat=args.remat)
    print(report.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
            f.write("\n")
    return 0
