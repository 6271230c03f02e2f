"""``m1 serve [CKPT]``: an OpenAI-compatible HTTP server (chat and text completions, streaming, tool calls)
with continuous batching and an exact prefix cache; see docs/serving.md.

Without CKPT it serves the newest checkpoint under ``runs/`` (what ``m1 train`` writes), or else the
``tiny`` preset with random weights (with a warning).
"""

from __future__ import annotations

import os
import sys

from m1_jax import distributed
from m1_jax.commands.runtime import CHECKPOINT_HELP, add_checkpoint_options, load_config_and_tokenizer, load_model
from m1_jax.quant.options import quantize_option

RUNS = "runs"


def add_arguments(p):
    p.add_argument("checkpoint", nargs="?", default=None,
                   help=f"{CHECKPOINT_HELP} (default: the newest under {RUNS}/, else a random tiny model)")
    add_checkpoint_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the checkpoint directory's name)")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together: the decode batch (default 8)")
    p.add_argument("--max-context", type=int, default=4096,
                   help="prompt + generated tokens per request (default 4096); each slot holds this many")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens fed per request per step, a power of two >= 16; also the prefix-cache "
                        "block (default 256)")
    p.add_argument("--prefill-rows", type=int, default=None,
                   help="prompts prefilled side by side (default 4, rounded up to a multiple of the mesh's "
                        "data*fsdp*expert)")
    p.add_argument("--prefix-cache-gb", type=float, default=1.0,
                   help="memory for the prefix cache in GiB (default 1; 0 turns it off)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="waiting requests beyond which new ones get HTTP 429 (default 256)")
    p.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=1,fsdp=1,expert=4,tensor=2: the model is served sharded")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds requests in flight get to finish on SIGTERM / Ctrl-C (default 30)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info)")


def newest_checkpoint(root: str = RUNS) -> str | None:
    """The most recently written run directory under ``root`` that holds a checkpoint, or None."""
    from m1_jax.checkpoint_io.locate import CheckpointError, locate

    if not os.path.isdir(root):
        return None
    runs = sorted((os.path.join(root, d) for d in os.listdir(root)), key=os.path.getmtime, reverse=True)
    for path in runs:
        try:
            locate(path)
        except CheckpointError:
            continue
        return path
    return None


def _check(args) -> None:
    for flag in ("slots", "max_context", "max_queue"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.prefill_chunk < 16 or args.prefill_chunk & (args.prefill_chunk - 1):
        raise ValueError(f"--prefill-chunk must be a power of two >= 16, got {args.prefill_chunk}")
    if args.prefill_rows is not None and args.prefill_rows < 1:
        raise ValueError(f"--prefill-rows must be a positive integer, got {args.prefill_rows}")
    if not args.prefix_cache_gb >= 0:
        raise ValueError(f"--prefix-cache-gb must be >= 0, got {args.prefix_cache_gb}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")


def build(args):
    """(FastAPI app, engine, served name) for the parsed arguments (the server is not started)."""
    from m1_jax.serving.engine import Engine, EngineConfig
    from m1_jax.serving.metrics import Metrics
    from m1_jax.serving.server import create_app

    if args.checkpoint is None:
        args.checkpoint = newest_checkpoint()
    if args.checkpoint is None:
        model, tokenizer, name = _random_tiny(args)
    else:
        cfg, tokenizer = load_config_and_tokenizer(args)
        if args.max_context > cfg.max_position_embeddings:  # before the weights load
            raise ValueError(f"--max-context {args.max_context} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        print(f"m1 serve: loading {args.checkpoint} ...", file=sys.stderr, flush=True)
        model = load_model(args, mesh=args.mesh)
        name = os.path.basename(os.path.normpath(args.checkpoint))
    name = args.served_model_name or name
    metrics = Metrics()
    config = EngineConfig(slots=args.slots, max_context=args.max_context, prefill_chunk=args.prefill_chunk,
                          prefix_cache_bytes=int(args.prefix_cache_gb * 2 ** 30), max_queue=args.max_queue,
                          prefill_rows=args.prefill_rows)
    engine = Engine(model, tokenizer, config, metrics=metrics)
    return create_app(engine, name, tokenizer, metrics=metrics), engine, name


def _random_tiny(args):
    # imported here, like every JAX import of the CLI: `m1 --help` and argument errors stay fast
    import jax.numpy as jnp
    from flax import nnx

    from m1_jax.model import M1Model
    from m1_jax.presets import resolve_config
    from m1_jax.quant.weights import quantize_model
    from m1_jax.sharding import as_mesh, shard_model
    from m1_jax.tokenizer import ByteTokenizer

    print(f"m1 serve: warning: no checkpoint given and none under {RUNS}/: serving the tiny preset with RANDOM "
          "weights (its replies are noise); pass a checkpoint directory", file=sys.stderr, flush=True)
    cfg = resolve_config("tiny")
    mesh = as_mesh(args.mesh)
    model = M1Model(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    quantize = quantize_option(args)
    if quantize is not None:
        quantize_model(model, quantize)
    if mesh is not None:
        model = shard_model(model, mesh)
    return model, ByteTokenizer(cfg.vocab_size), "tiny-random"


def run(args) -> int:
    _check(args)
    distributed.setup(mesh=args.mesh)
    from m1_jax.serving.server import serve

    app, engine, name = build(args)
    print(f"m1 serve: serving {name!r} on http://{args.host}:{args.port}/v1 ({args.slots} slots x "
          f"{engine.context} tokens; prefix cache {args.prefix_cache_gb:g} GiB)", file=sys.stderr, flush=True)
    serve(app, args.host, args.port, shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)
    return 0
