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
    p.epilog = ("Exit status 1 when the plan does not fit the chips' HBM; the report then names the nearest "
                "topology / mesh that would fit by an estimate.")


def run(args) -> int:
    import jax

    from m1_jax import aot, sharding
    from m1_jax.presets import resolve_config

    cfg = resolve_config(args.config)
    mesh = sharding.make_mesh(args.mesh, aot.topology_devices(args.topology))
    # default: one row per data-parallel shard
    batch = sharding.axis_size(mesh, sharding.BATCH_AXES) if args.batch is None else args.batch
    param_dtype = DTYPES[args.param_dtype or ("float32" if args.mode == "train" else "bfloat16")]
    print(f"compiling {args.mode} for {args.topology} (mesh {args.mesh}) ...", flush=True)
    try:
        report = aot.plan(cfg, args.topology, args.mesh, args.mode, batch=batch, seq_len=args.seq_len,
                          context=args.context, param_dtype=param_dtype, dtype=DTYPES[args.dtype],
                          lightning_impl=args.lightning_impl, remat=args.remat)
    except jax.errors.JaxRuntimeError as e:  # XLA refuses a program larger than the HBM: say by how much
        from m1_jax.aot_fit import hbm_shortfall

        shortfall = hbm_shortfall(str(e))
        if shortfall is None:
            if "RESOURCE_EXHAUSTED" in str(e):
                raise ValueError(f"XLA cannot compile the plan: {str(e).strip().splitlines()[0]}") from None
            raise
        needed, available = shortfall
        print(misfit(args, cfg, mesh, param_dtype, needed, available, "XLA"))
        write_json(args.json, {"fits": False, "total_bytes": needed, "hbm_bytes": available})
        return 1
    print(report.table())
    write_json(args.json, report.to_dict())
    if report.fits is False:
        print(misfit(args, cfg, mesh, param_dtype, report.total_bytes, report.hbm_bytes, "compiled"))
        return 1
    return 0


def write_json(path: str | None, data: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")


def misfit(args, cfg, mesh, param_dtype, needed: int, available: int, source: str) -> str:
    """What a plan that does not fit needs, by how much it is over, and the nearest plan that would fit
    by an estimate (:func:`m1_jax.aot_fit.nearest_fit`)."""
    from m1_jax import aot_fit, sharding

    over = needed - available
    spec = sharding.format_mesh_spec(mesh)
    lines = [f"does not fit: {args.mode} on {args.topology} (mesh {spec}) needs {needed / aot_fit.GiB:.2f} GiB per "
             f"device of {available / aot_fit.GiB:.2f} GiB HBM ({source}): {over / aot_fit.GiB:.2f} GiB "
             f"({over / available:.0%}) too much"]
    fit, given = aot_fit.nearest_fit(cfg, args.topology, dict(mesh.shape), args.mode, batch=args.batch,
                                     context=args.context, param_dtype=param_dtype, dtype=DTYPES[args.dtype],
                                     available=available, needed=needed)
    lines.append(f"  this plan by the estimate: {given.describe()}")
    if fit is None:
        lines.append(f"  no larger {args.topology.partition(':')[0]} topology or other mesh fits by the estimate")
    else:
        rows = "" if fit.batch == given.batch else f" (batch {fit.batch})"
        lines.append(f"  nearest plan that fits by the estimate: --topology {fit.topology} --mesh {fit.mesh}{rows}: "
                     f"{fit.describe()}")
    lines.append(f"  ({aot_fit.ESTIMATE_NOTE})")
    return "\n".join(lines)
