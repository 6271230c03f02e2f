"""``m1 convert SRC DST``: a Hugging Face / PyTorch checkpoint directory -> an Orbax checkpoint."""

from __future__ import annotations

import json

from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.quant.options import add_quantize_arguments, quantize_option


def add_arguments(p):
    p.add_argument("src", help="checkpoint directory: config.json + *.safetensors (single or sharded with an "
                               "index; original or transformers-5 key names) or PyTorch *.bin files")
    p.add_argument("dst", help="output directory (Orbax checkpoint + config.json + tokenizer files)")
    p.add_argument("--dtype", choices=("bf16", "fp32", "keep"), default="keep",
                   help="parameter dtype of the output (router gates stay float32); keep: as stored")
    add_quantize_arguments(p, "write the experts' weights as int8 values + float32 per-output-channel scales "
                              "(docs/quantization.md)")
    p.add_argument("--mesh", default=None,
                   help="mesh spec like 'fsdp=-1,tensor=4': --verify restores onto this mesh")
    p.add_argument("--resume", action="store_true", help="finish an interrupted conversion into DST")
    p.add_argument("--verify", action="store_true",
                   help="re-read every written tensor and compare checksums with the source; for small "
                        "models also compare logits")
    p.add_argument("--workers", type=int, default=None,
                   help="threads converting tensors side by side (default: twice the cores, 4 to 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    # imported when the command runs, so that `m1` starts without loading the converter
    from m1_jax.convert.convert import convert

    if args.workers is not None and args.workers < 1:
        raise CheckpointError(f"--workers {args.workers}: expected a positive number of threads")

    mesh = None
    if args.mesh:
        from m1_jax import sharding  # loads JAX: only when a mesh is asked for

        mesh = sharding.make_mesh(args.mesh)
    summary = convert(args.src, args.dst, dtype=args.dtype, resume=args.resume, verify=args.verify, mesh=mesh,
                      progress=not args.no_progress, workers=args.workers, quantize=quantize_option(args))
    print(json.dumps(summary))
    return 0
