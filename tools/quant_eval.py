"""int8 weights against full precision on held-out text: perplexity and teacher-forced next-token agreement.

Loads a checkpoint twice, as stored and with ``quantize="int8"`` (:mod:`m1_jax.quant`), feeds both the same
windows of held-out text and reports each model's perplexity, its relative rise, how often the two models'
next-token argmax agree (teacher forced: every position sees the true prefix) and the relative error of the
logits. Byte-level tokenizer (the demo model's); the default held-out text is this repository's own Python
sources, which the demo model (trained on the Python standard library) never saw::

    python tools/quant_eval.py runs/demo [--attention] [--windows 256] [--seq-len 128] [--json out.json]

``--bench`` instead times, side by side in one run, one MoE layer (hidden 512, 8 experts of width 1024, top-2,
2,048 tokens) and one decode step of an 8-layer model of that shape (batch 1, cache of 512 tokens), with bf16
weights and with int8 experts, bf16 compute (min of ``--repeats`` interleaved runs)::

    python tools/quant_eval.py --bench [--repeats 7]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import m1_jax  # noqa: E402
from m1_jax.cache import init_cache  # noqa: E402
from m1_jax.generation import decode_step  # noqa: E402
from m1_jax.layers.moe import MoE  # noqa: E402
from m1_jax.model import init_model  # noqa: E402
from m1_jax.presets import resolve_config  # noqa: E402
from m1_jax.quant.spec import QuantConfig  # noqa: E402
from m1_jax.quant.weights import quantize_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def held_out_windows(files: list[str], n: int, length: int, seed: int) -> np.ndarray:
    """``n`` random windows of ``length`` bytes (int32 byte ids) from the concatenated ``files``."""
    data = np.frombuffer(b"".join(open(f, "rb").read() for f in sorted(files)), np.uint8).astype(np.int32)
    if len(data) <= length:
        raise SystemExit(f"the held-out files hold {len(data)} bytes, fewer than one window of {length}")
    starts = np.random.default_rng(seed).integers(0, len(data) - length, size=n)
    return np.stack([data[s:s + length] for s in starts])


@nnx.jit
def _scores(model, ids):
    """(per-token NLL of the next byte [B, T-1], argmax [B, T-1], logits [B, T-1, V]) of windows ``ids``."""
    logits = model(ids[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return nll, jnp.argmax(logits, axis=-1), logits


def evaluate(model, windows: np.ndarray, batch: int):
    nll, top, logits = [], [], []
    for i in range(0, len(windows), batch):
        a, b, c = _scores(model, jnp.asarray(windows[i:i + batch]))
        nll.append(np.asarray(a))
        top.append(np.asarray(b))
        logits.append(np.asarray(c))
    return np.concatenate(nll), np.concatenate(top), np.concatenate(logits)


def _min_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def bench(repeats: int) -> dict:
    """ms of one MoE layer and of one decode step, bf16 weights against int8 experts (bf16 compute)."""
    cfg = resolve_config("small").replace(hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                                          num_key_value_heads=2, head_dim=64, rotary_dim=32)
    moe = MoE(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    moe_q = MoE(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, quantize=QuantConfig())
    x = jax.random.normal(jax.random.key(0), (1, 2048, cfg.hidden_size), jnp.bfloat16)
    layer = nnx.jit(lambda m, x: m(x)[0])
    models = {w: quantize_model(init_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), "int8") if w == "int8"
              else init_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16) for w in ("bf16", "int8")}
    caches = {w: init_cache(cfg, 1, 512, dtype=jnp.bfloat16) for w in models}
    tok = jnp.array([65], jnp.int32)

    def step(w):
        caches[w], logits = decode_step(models[w], caches[w], tok)
        return logits

    runs = {"moe_layer": {"bf16": lambda: layer(moe, x), "int8": lambda: layer(moe_q, x)},
            "decode_step": {"bf16": lambda: step("bf16"), "int8": lambda: step("int8")}}
    for fns in runs.values():  # compile, warm up
        for fn in fns.values():
            jax.block_until_ready(fn())
    out = {name: {w: float("inf") for w in fns} for name, fns in runs.items()}
    for _ in range(repeats):  # interleaved, so both see the same machine load
        for name, fns in runs.items():
            for w, fn in fns.items():
                out[name][w] = min(out[name][w], 1e3 * _min_time(fn, 1))
    for name, t in out.items():
        print(f"{name:12s} bf16 {t['bf16']:8.2f} ms   int8 {t['int8']:8.2f} ms   int8 / bf16 {t['int8'] / t['bf16']:.2f}x")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?",
                   help="a checkpoint directory (an m1 train workdir, m1 convert output, HF directory)")
    p.add_argument("--files", nargs="*", default=None,
                   help="held-out text files (default: this repository's m1_jax/**/*.py)")
    p.add_argument("--windows", type=int, default=256, help="windows of held-out text (default 256)")
    p.add_argument("--seq-len", type=int, default=128, help="next-token predictions per window (default 128)")
    p.add_argument("--batch", type=int, default=32, help="windows per forward pass (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", action="store_true", help="the attention projections in int8 too")
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    p.add_argument("--bench", action="store_true", help="time the MoE layer and a decode step instead (module doc)")
    p.add_argument("--repeats", type=int, default=7, help="--bench: interleaved repeats (the min is reported)")
    args = p.parse_args(argv)
    if args.bench:
        out = bench(args.repeats)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
        return 0
    if args.checkpoint is None:
        p.error("a checkpoint is needed (or --bench)")

    files = args.files or glob.glob(os.path.join(REPO, "m1_jax", "**", "*.py"), recursive=True)
    windows = held_out_windows(files, args.windows, args.seq_len + 1, args.seed)
    full = m1_jax.from_pretrained(args.checkpoint)
    qc = QuantConfig(attention=args.attention)
    int8 = m1_jax.from_pretrained(args.checkpoint, quantize=qc)
    t0 = time.perf_counter()
    nll_f, top_f, logits_f = evaluate(full, windows, args.batch)
    nll_q, top_q, logits_q = evaluate(int8, windows, args.batch)
    ppl_f, ppl_q = float(np.exp(nll_f.mean())), float(np.exp(nll_q.mean()))
    out = {
        "checkpoint": args.checkpoint, "quantize": qc.to_dict(), "held_out_files": len(files),
        "positions": int(nll_f.size), "perplexity_full": ppl_f, "perplexity_int8": ppl_q,
        "perplexity_rise": ppl_q / ppl_f - 1,
        "argmax_agreement": float(np.mean(top_f == top_q)),
        "next_token_accuracy_full": float(np.mean(top_f == windows[:, 1:])),
        "next_token_accuracy_int8": float(np.mean(top_q == windows[:, 1:])),
        "logits_relative_error": float(np.linalg.norm(logits_q - logits_f) / np.linalg.norm(logits_f)),
        "seconds": time.perf_counter() - t0,
    }
    print(f"held-out: {out['positions']:,} next-byte predictions ({args.windows} windows of {args.seq_len}) from "
          f"{len(files)} files")
    print(f"perplexity        full {ppl_f:.4f}   int8 {ppl_q:.4f}   rise {100 * out['perplexity_rise']:+.3f}%")
    print(f"argmax agreement  {100 * out['argmax_agreement']:.2f}% of positions (teacher forced)")
    print(f"next-byte acc.    full {100 * out['next_token_accuracy_full']:.2f}%   "
          f"int8 {100 * out['next_token_accuracy_int8']:.2f}%")
    print(f"logits rel. error {100 * out['logits_relative_error']:.3f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
