"""``m1 export CKPT DST``: a converted Orbax checkpoint, or a trained model, -> Hugging Face safetensors
shards; a LoRA run's adapters merged (``--merge-lora``) or as a PEFT adapter (``--lora-only``)."""

from __future__ import annotations

import json


def add_arguments(p):
    p.add_argument("ckpt", help="a directory written by `m1 convert` (checked against its recorded checksums), "
                                "or an `m1 train` workdir (its latest step) or step directory "
                                "WORKDIR/checkpoints/N")
    p.add_argument("dst", help="new output directory (safetensors shards, index, config.json, tokenizer files)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", action="store_true",
                      help="a LoRA run (`m1 train --lora`): write the full model with its adapters merged")
    lora.add_argument("--lora-only", action="store_true",
                      help="a LoRA run: write only its adapters, as a Hugging Face PEFT adapter (adapter_config.json, "
                           "adapter_model.safetensors); attention targets only (docs/lora.md)")


def run(args) -> int:
    # imported when the command runs, so that `m1` starts without loading the exporter
    from m1_jax.convert.export import export, parse_size

    summary = export(args.ckpt, args.dst, max_shard_bytes=parse_size(args.max_shard_size),
                     progress=not args.no_progress, merge_lora=args.merge_lora, lora_only=args.lora_only)
    print(json.dumps(summary))
    return 0
