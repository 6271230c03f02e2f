"""``m1 aot``: compile a train / RL update / forward / decode step for a TPU topology on this host and report
the per-device memory, the HBM of the chip, FLOPs per step and compile time (see :mod:`m1_jax.aot`)."""

from __future__ import annotations

import json

import jax.numpy as jnp

from m1_jax.lora.options import add_lora_argument, lora_overrides
from m1_jax.quant.options import add_quantize_arguments, quantize_option
from m1_jax.rl.objectives import OBJECTIVES

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def add_arguments(p):
    p.add_argument("--config", required=True, help="config.json, checkpoint directory or preset (e.g. minimax-m1-40k)")
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:4x4x4, v5e:2x2, v6e:4x4")
    p.add_argument("--mesh", required=True, help="mesh over the topology's chips, e.g. fsdp=-1,expert=8 "
                                                 "(axes data, fsdp, expert, tensor; -1 = the rest)")
    p.add_argument("--mode", choices=("train", "rl", "forward", "decode", "prefill", "serve"), default="train",
                   help="rl: the RL policy update (m1_jax.rl.update); prefill: one --seq-len chunk of a chunked "
                        "prefill on a cache of --context tokens; serve: m1 serve's decode step over --batch slots "
                        "of --context tokens")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch, the slots for serve (default: data*fsdp*expert x --micro-batches, one row "
                        "per data shard in each micro-batch)")
    p.add_argument("--seq-len", type=int, default=8192,
                   help="tokens per row for train / forward, prompt + response for rl; chunk length for prefill")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="train / rl: gradient accumulation over this many slices of --batch")
    p.add_argument("--objective", choices=tuple(OBJECTIVES), default=None,
                   help="rl: the policy-gradient objective (default cispo)")
    p.add_argument("--kl", type=float, default=0.0, metavar="COEF",
                   help="rl: KL penalty coefficient against a frozen reference (its log-probs join the batch); "
                        "default 0, none")
    p.add_argument("--context", type=int, default=1 << 20, help="KV cache length for decode / prefill")
    p.add_argument("--param-dtype", choices=DTYPES, default=None,
                   help="parameter storage dtype (default: float32 for train and rl, bfloat16 otherwise)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="compute dtype")
    p.add_argument("--head-dtype", choices=("auto", *DTYPES), default="auto",
                   help="the output head's matmul dtype (auto: the compute dtype; float32 as the MiniMax-M1 "
                        "report's RL)")
    p.add_argument("--lightning-impl", choices=("auto", "xla", "pallas"), default="auto",
                   help="lightning attention: auto = the Pallas TPU kernels")
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"), default="none",
                   help="train / rl: rematerialise each layer period in the backward pass (jax.checkpoint policy)")
    add_quantize_arguments(p, "inference modes: the experts' weights in int8 with per-output-channel scales "
                              "(docs/quantization.md)")
    add_lora_argument(p, "train: plan a LoRA fine-tune, as m1 train --lora runs it")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    p.epilog = ("Exit status 1 when the plan does not fit the chips' HBM; the report then names the nearest "
                "topology / mesh that would fit by an estimate.")


def run(args) -> int:
    import jax

    from m1_jax import aot, sharding
    from m1_jax.presets import resolve_config
    from m1_jax.rl.update import UpdateOptions
    from m1_jax.run_config import RunConfig, parse_override

    if args.mode != "rl" and (args.objective is not None or args.kl):
        raise ValueError(f"--objective and --kl apply to --mode rl, not --mode {args.mode}")
    if args.kl < 0:
        raise ValueError(f"--kl must be >= 0, got {args.kl}")
    cfg = resolve_config(args.config)
    mesh = sharding.make_mesh(args.mesh, aot.topology_devices(args.topology))
    if args.micro_batches < 1:
        raise ValueError(f"--micro-batches must be >= 1, got {args.micro_batches}")
    shards = sharding.axis_size(mesh, sharding.BATCH_AXES)
    # default: one row per data-parallel shard in each micro-batch
    batch = shards * args.micro_batches if args.batch is None else args.batch
    if args.micro_batches > 1 and batch % (shards * args.micro_batches):
        raise ValueError(f"--micro-batches {args.micro_batches}: each micro-batch's rows are split over "
                         f"data*fsdp*expert={shards} shards, so --batch must be a multiple of "
                         f"{shards * args.micro_batches}, got {batch}")
    if args.lora and args.mode != "train":
        raise ValueError(f"--lora applies to --mode train, not --mode {args.mode}")
    run_config = RunConfig()
    run_config.data.micro_batches = args.micro_batches
    run_config.model.head_dtype = args.head_dtype
    for text in lora_overrides(args):
        run_config.set(*parse_override(text), source=f"--lora {args.lora}")
    run_config.validate()
    update = UpdateOptions(objective=args.objective or "cispo", micro_batches=args.micro_batches,
                           objective_options={"kl_coef": args.kl} if args.kl else {})
    param_dtype = DTYPES[args.param_dtype or ("float32" if args.mode in ("train", "rl") else "bfloat16")]
    print(f"compiling {args.mode} for {args.topology} (mesh {args.mesh}) ...", flush=True)
    try:
        report = aot.plan(cfg, args.topology, args.mesh, args.mode, batch=batch, seq_len=args.seq_len,
                          context=args.context, param_dtype=param_dtype, dtype=DTYPES[args.dtype],
                          lightning_impl=args.lightning_impl, remat=args.remat, run=run_config, update=update,
                          quantize=quantize_option(args))
    except jax.errors.JaxRuntimeError as e:  # XLA refuses a program larger than the HBM: say by how much
        from m1_jax.aot_fit import hbm_shortfall

        shortfall = hbm_shortfall(str(e))
        if shortfall is None:
            if "RESOURCE_EXHAUSTED" in str(e):
                raise ValueError(f"XLA cannot compile the plan: {str(e).strip().splitlines()[0]}") from None
            raise
        needed, available = shortfall
        print(misfit(args, cfg, mesh, param_dtype, needed, available, run_config))
        write_json(args.json, {"fits": False, "total_bytes": needed, "hbm_bytes": available})
        return 1
    print(report.table())  # compiled: within XLA's HBM check (m1_jax.aot.AotReport.fits)
    write_json(args.json, report.to_dict())
    return 0


def write_json(path: str | None, data: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")


def misfit(args, cfg, mesh, param_dtype, needed: int, available: int, run_config) -> str:
    """What a plan that does not fit needs, by how much it is over, and the nearest plan that would fit
    by an estimate (:func:`m1_jax.aot_fit.nearest_fit`)."""
    from m1_jax import aot_fit, sharding

    over = needed - available
    spec = sharding.format_mesh_spec(mesh)
    lines = [(f"does not fit: {args.mode} on {args.topology} (mesh {spec}) needs {needed / aot_fit.GiB:.2f} GiB per "
             f"device of {available / aot_fit.GiB:.2f} GiB HBM (XLA): {over / aot_fit.GiB:.2f} GiB "
             f"({over / available:.0%}) too much")]
    fit, given = aot_fit.nearest_fit(cfg, args.topology, dict(mesh.shape), args.mode, batch=args.batch,
                                     context=args.context, param_dtype=param_dtype, dtype=DTYPES[args.dtype],
                                     available=available, needed=needed, quantize=quantize_option(args),
                                     run=run_config)
    lines.append(f"  this plan by the estimate: {given.describe()}")
    if fit is None:
        lines.append(f"  no larger {args.topology.partition(':')[0]} topology or other mesh fits by the estimate")
    else:
        rows = "" if fit.batch == given.batch else f" (batch {fit.batch})"
        lines.append(f"  nearest plan that fits by the estimate: --topology {fit.topology} --mesh {fit.mesh}{rows}: "
                     f"{fit.describe()}")
    lines.append(f"  ({aot_fit.ESTIMATE_NOTE})")
    return "\n".join(lines)
