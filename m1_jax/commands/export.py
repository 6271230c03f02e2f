"""``m1 export CKPT DST``: a converted Orbax checkpoint, or a trained model, -> Hugging Face safetensors
shards."""

from __future__ import annotations

import json


def add_arguments(p):
    p.add_argument("ckpt", help="a directory written by `m1 convert` (checked against its recorded checksums), "
                                "or an `m1 train` workdir (its latest step) or step directory "
                                "WORKDIR/checkpoints/N")
    p.add_argument("dst", help="new output directory (safetensors shards, index, config.json, tokenizer files)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    # imported when the command runs, so that `m1` starts without loading the exporter
    from m1_jax.convert.export import export, parse_size

    summary = export(args.ckpt, args.dst, max_shard_bytes=parse_size(args.max_shard_size),
                     progress=not args.no_progress)
    print(json.dumps(summary))
    return 0
