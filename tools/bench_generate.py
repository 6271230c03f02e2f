"""Decode speed with the inference cache: constant-size lightning state vs. a growing KV cache.

For three configs of the same size (the ``tiny`` preset: hybrid 3 lightning + 1 softmax; the same with
only lightning layers; the same with only softmax layers) and each context length, the cache is
filled to that context (random keys/values and lightning states: decode cost does not depend on the
values), then ``m1_jax.generate`` feeds one prompt token and decodes ``--new-tokens`` greedily in its
compiled loop. Reported: median (and minimum) wall time per generated token over ``--repeats`` runs
after one compile run, the contexts interleaved within each repetition, tokens/s, and cache memory
(lightning states and KV caches, bytes).

  python tools/bench_generate.py                        # table + bench_generate.json
  python tools/bench_generate.py --contexts 1024,32768 --new-tokens 64 --batch 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import m1_jax  # noqa: E402
from m1_jax.cache import init_cache  # noqa: E402
from m1_jax.config import FULL, LINEAR  # noqa: E402
from m1_jax.presets import resolve_config  # noqa: E402


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        return platform.processor() or "unknown"


def filled_cache(cfg, batch, context, room, seed=0):
    cache = init_cache(cfg, batch, context + room)
    rng = np.random.default_rng(seed)
    fill = lambda a, scale: jnp.asarray(rng.normal(0, scale, a.shape).astype(np.float32)) if a.size else a
    return cache.replace(lightning=fill(cache.lightning, 0.01), keys=fill(cache.keys, 1.0),
                         values=fill(cache.values, 1.0), lengths=jnp.full((batch,), context, jnp.int32))


def bench(model, contexts, batch, new_tokens, repeats):
    """Per context: median and minimum seconds per generated token. Contexts are interleaved within each
    repetition so that a busy machine slows all of them alike."""
    cfg = model.cfg
    prompt = [[1]] * batch
    times = {c: [] for c in contexts}
    caches = {}
    for r in range(repeats + 1):
        for c in contexts:
            cache = filled_cache(cfg, batch, c, new_tokens + 1, seed=r)
            caches[c] = cache
            jax.block_until_ready(cache)
            t0 = time.perf_counter()
            jax.block_until_ready(m1_jax.generate(model, prompt, max_new_tokens=new_tokens, cache=cache))
            if r:  # the first round compiles
                times[c].append((time.perf_counter() - t0) / new_tokens)
    rows = []
    for c in contexts:
        nbytes = caches[c].nbytes()
        med = statistics.median(times[c])
        rows.append({"context": c, "batch": batch, "new_tokens": new_tokens, "s_per_token": med,
                     "s_per_token_min": min(times[c]), "tokens_per_s": batch / med,
                     "lightning_state_bytes": nbytes["lightning"], "kv_cache_bytes": nbytes["kv"]})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--contexts", default="1024,32768")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_generate.json")
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    base = resolve_config(args.config)
    # Random weights: the positions the model may see only bound generate's length check; make room for the
    # longest context plus the new tokens.
    base = base.replace(max_position_embeddings=max(base.max_position_embeddings,
                                                    max(contexts) + args.new_tokens + 1))
    n = base.num_hidden_layers
    variants = {"hybrid": base,
                "lightning-only": base.replace(layer_types=(LINEAR,) * n),
                "softmax-only": base.replace(layer_types=(FULL,) * n)}
    rows = []
    for name, cfg in variants.items():
        model = m1_jax.init_model(cfg, seed=0)
        for row in bench(model, contexts, args.batch, args.new_tokens, args.repeats):
            row = {"model": name, **row}
            rows.append(row)
            print(f"{name:15s} ctx {row['context']:6d}: {row['s_per_token'] * 1e3:8.3f} ms/token (min "
                  f"{row['s_per_token_min'] * 1e3:.3f})  {row['tokens_per_s']:8.1f} tok/s  lightning state "
                  f"{row['lightning_state_bytes']:>9d} B  KV cache {row['kv_cache_bytes']:>10d} B", flush=True)
    ctxs = sorted({r["context"] for r in rows})
    print("\n| model | " + " | ".join(f"ms/token @ {c}" for c in ctxs) + f" | ratio {ctxs[-1]}/{ctxs[0]} (median) "
          f"| ratio (min) | lightning state (B) | KV cache @ " + " / ".join(map(str, ctxs)) + " (B) |")
    print("|---" * (len(ctxs) + 5) + "|")
    for name in variants:
        rs = {r["context"]: r for r in rows if r["model"] == name}
        ms = [rs[c]["s_per_token"] * 1e3 for c in ctxs]
        mn = [rs[c]["s_per_token_min"] * 1e3 for c in ctxs]
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in ms) + f" | {ms[-1] / ms[0]:.2f} | {mn[-1] / mn[0]:.2f} | "
              f"{rs[ctxs[0]]['lightning_state_bytes']} | " + " / ".join(str(rs[c]["kv_cache_bytes"]) for c in ctxs)
              + " |")
    meta = {"command": "python tools/bench_generate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": _cpu_model(), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "jax": jax.__version__,
            "backend": jax.default_backend(), "config": args.config}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"\n{meta}\nwrote {args.out}")


if __name__ == "__main__":
    main()
