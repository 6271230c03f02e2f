"""Writes a synthetic MiniMax-M1 checkpoint: M1's key names and layout at reduced width, bf16.

The defaults give 24 layers (period of 8: 7 lightning + 1 softmax), 32 experts, M1's vocabulary
(200,064), hidden 512, expert width 1024: about 2.9 GB in 9 shards. As in the release, tensors are not
grouped by layer: the key order is shuffled before the shards are cut, so every layer's experts are
scattered over many shards. Router gates are float32 (as released), everything else bf16. Values
are N(0, 0.02). Tensors are generated and written one at a time (headers first, from shapes alone).

    python tools/make_synthetic_checkpoint.py /tmp/m1_synth [--layers 24 --hidden 512 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from m1_jax.checkpoint_io import keys as key_table  # noqa: E402
from m1_jax.config import M1Config, m1_layer_types  # noqa: E402
from m1_jax.convert.export import _header, _shards  # noqa: E402
from m1_jax.presets import CONFIG_DIR  # noqa: E402


def synthetic_config(args) -> dict:
    with open(CONFIG_DIR / "minimax-m1-80k.json") as f:
        cfg = json.load(f)
    types = m1_layer_types(args.layers)
    cfg.update(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.intermediate,
               num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
               rotary_dim=args.head_dim // 2, num_local_experts=args.experts, vocab_size=args.vocab,
               attn_type_list=[0 if t == "linear_attention" else 1 for t in types])
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output directory (must not exist)")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--vocab", type=int, default=200064)
    p.add_argument("--shard-size", type=float, default=350e6, help="bytes per shard")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        p.error(f"{args.out} exists")
    raw = synthetic_config(args)
    cfg = M1Config.from_dict(raw)
    rng = np.random.default_rng(args.seed)
    entries = []
    for key, pl in key_table.canonical_keys(cfg):
        dtype = np.dtype(np.float32) if key.endswith("block_sparse_moe.gate.weight") else np.dtype(ml_dtypes.bfloat16)
        entries.append((key, pl.hf_shape, dtype))
    entries = [entries[i] for i in rng.permutation(len(entries))]  # release order: not grouped by layer
    shards = _shards(entries, int(args.shard_size))
    os.makedirs(args.out)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    weight_map, total, t0 = {}, 0, time.time()
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(_header(shard))
            for key, shape, dtype in shard:
                x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)
                f.write(x.reshape(-1).view(np.uint8).data)
                weight_map[key] = name
                total += x.nbytes
        print(f"{name}: {len(shard)} tensors", flush=True)
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    largest = max(int(np.prod(s)) * d.itemsize for _, s, d in entries)
    print(json.dumps({"dir": args.out, "tensors": len(entries), "shards": len(shards), "bytes": total,
                      "largest_tensor_bytes": largest, "seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
