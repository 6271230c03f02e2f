"""Side by side in one process on this machine: transformers' PyTorch ``MiniMaxForCausalLM`` against m1-jax,
float32, the same random weights.

transformers' model is built from a ``MiniMaxConfig`` (default ~143M parameters: hidden 512, 8 layers of
3 lightning : 1 softmax per 4, 8 heads x 64 (4 key/value heads), 8 experts of 1024 top-2, vocabulary 32,000,
lightning block 256; rotary over the whole head, as transformers rotates it), seeded, written with
``save_pretrained`` and loaded with ``m1_jax.from_pretrained``. Before anything is timed the two are
checked on a short prompt (batch 2, a few lightning blocks long): the maximum |logits difference| of a
full forward, and the greedy continuation of both; fewer than 100% equal tokens stop the run (exit 1).

Timed (median of ``--repeats``, after one warm-up run of each case; the two sides alternate so that a
busy machine slows both alike; torch uses ``os.cpu_count()`` threads):

* prefill of ``--prefill`` tokens at batch 1 and ``--batch``: transformers ``model(ids, use_cache=True,
  logits_to_keep=1)`` (the cache filled, the last position's logits, as ``generate`` runs its prefill);
  m1-jax ``m1_jax.prefill(model, ids)`` until its cache and logits are ready;
* prefill + ``--new-tokens`` greedy tokens at batch 1 and ``--batch``: transformers ``model.generate(ids,
  do_sample=False, max_new_tokens=N, min_new_tokens=N)``; m1-jax ``m1_jax.generate(model, ids,
  max_new_tokens=N)``. The config has no end-of-sequence token, so both always produce N tokens.

m1-jax compiles each shape on its first call: that warm-up time less the median is reported as its
compile time, outside the timings. The greedy tokens (and, for the prefills, the last logits) of the
timed runs are compared as well. Printed: a markdown table (transformers / m1-jax > 1 means m1-jax is
faster), the machine (CPU model, cores, memory), the versions and the date; ``--out`` gets the JSON.

  python tools/bench_vs_transformers.py                       # the ~143M model, 2,048 + 64 tokens, batch 1 and 8
  python tools/bench_vs_transformers.py --hidden 256 --layers 4 --vocab 8000 --prefill 512
  python tools/bench_vs_transformers.py --smoke --out /tmp/smoke.json   # a tiny config, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

try:
    import torch
    import transformers
except ImportError as e:  # the comparison needs the optional PyTorch side
    sys.exit(f"bench_vs_transformers needs torch and transformers ({e}): pip install -e '.[test,torch]'")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import m1_jax  # noqa: E402

HEAD_DIM_DEFAULT = 64
SMOKE = {"hidden": 64, "layers": 2, "experts": 4, "vocab": 512, "block": 16, "prefill": 64, "new_tokens": 4,
         "batch": 2, "repeats": 1}
CHECK_BATCH = 2
CHECK_NEW_TOKENS = 16


def layer_types(n: int) -> list[str]:
    """3 lightning : 1 softmax per 4 layers; the last layer is a softmax layer (also with fewer than 4)."""
    return ["full_attention" if (i + 1) % 4 == 0 or i == n - 1 else "linear_attention" for i in range(n)]


def hf_config(args) -> transformers.MiniMaxConfig:
    heads = 8
    if args.hidden % heads:
        sys.exit(f"--hidden must be a multiple of {heads} (the number of heads), got {args.hidden}")
    return transformers.MiniMaxConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, layer_types=layer_types(args.layers), num_attention_heads=heads,
        num_key_value_heads=heads // 2, head_dim=args.hidden // heads, num_local_experts=args.experts,
        num_experts_per_tok=2, block_size=args.block, max_position_embeddings=max(4096, args.prefill + args.new_tokens),
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        mem_gib = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "torch_threads": torch.get_num_threads(),
            "jax_backend": jax.default_backend(), "jax_devices": jax.device_count()}


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Per cent of equal tokens in two [batch, n] arrays."""
    return 100.0 * float(np.mean(np.asarray(a) == np.asarray(b)))


class Sides:
    """The two models and how each runs a case; every call returns host numpy results."""

    def __init__(self, tf_model, jx_model, new_tokens: int):
        self.tf, self.jx, self.n = tf_model, jx_model, new_tokens

    def tf_prefill(self, ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.tf(input_ids=torch.as_tensor(ids), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].numpy()

    def jx_prefill(self, ids: np.ndarray) -> np.ndarray:
        cache, logits = m1_jax.prefill(self.jx, ids)
        jax.block_until_ready((cache, logits))
        return np.asarray(logits)

    def tf_generate(self, ids: np.ndarray, n: int | None = None) -> np.ndarray:
        n = self.n if n is None else n
        t = torch.as_tensor(ids)
        with torch.inference_mode():
            out = self.tf.generate(t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=n,
                                   min_new_tokens=n)
        return out[:, ids.shape[1]:].numpy()

    def jx_generate(self, ids: np.ndarray, n: int | None = None) -> np.ndarray:
        tokens = m1_jax.generate(self.jx, ids, max_new_tokens=self.n if n is None else n)
        return np.asarray(jax.block_until_ready(tokens))


def check(sides: Sides, ids: np.ndarray) -> dict:
    """Logits of a full forward and greedy tokens of both sides on ``ids`` (before any timing)."""
    with torch.inference_mode():
        ref = sides.tf(input_ids=torch.as_tensor(ids), use_cache=False).logits.numpy()
    got = np.asarray(sides.jx(ids))
    tf_tokens = sides.tf_generate(ids, CHECK_NEW_TOKENS)
    jx_tokens = sides.jx_generate(ids, CHECK_NEW_TOKENS)
    return {"prompt_shape": list(ids.shape), "new_tokens": CHECK_NEW_TOKENS,
            "max_abs_logits_diff": float(np.abs(got - ref).max()), "max_abs_logits": float(np.abs(ref).max()),
            "agreement_pct": agreement(tf_tokens, jx_tokens),
            "transformers_tokens": tf_tokens.tolist(), "m1_jax_tokens": jx_tokens.tolist()}


def timed(fn, ids):
    t = time.perf_counter()
    out = fn(ids)
    return time.perf_counter() - t, out


def run_case(sides: Sides, kind: str, ids: np.ndarray, repeats: int) -> dict:
    tf_fn, jx_fn = ((sides.tf_prefill, sides.jx_prefill) if kind == "prefill"
                    else (sides.tf_generate, sides.jx_generate))
    tf_first, _ = timed(tf_fn, ids)
    jx_first, _ = timed(jx_fn, ids)
    tf_times, jx_times = [], []
    for _ in range(repeats):
        t, tf_out = timed(tf_fn, ids)
        tf_times.append(t)
        t, jx_out = timed(jx_fn, ids)
        jx_times.append(t)
    tf_s, jx_s = statistics.median(tf_times), statistics.median(jx_times)
    row = {"case": kind, "batch": int(ids.shape[0]), "prefill": int(ids.shape[1]),
           "new_tokens": 0 if kind == "prefill" else sides.n,
           "transformers_s": tf_s, "m1_jax_s": jx_s, "ratio": tf_s / jx_s,
           "transformers_times": tf_times, "m1_jax_times": jx_times,
           "transformers_first_s": tf_first, "m1_jax_first_s": jx_first, "m1_jax_compile_s": max(jx_first - jx_s, 0.0)}
    if kind == "prefill":  # the next token from the last logits, and the logits themselves
        row["agreement_pct"] = agreement(tf_out.argmax(-1), jx_out.argmax(-1))
        row["max_abs_logits_diff"] = float(np.abs(tf_out - jx_out).max())
    else:
        row["agreement_pct"] = agreement(tf_out, jx_out)
    return row


def label(row: dict) -> str:
    s = f"prefill {row['prefill']:,} tokens"
    if row["new_tokens"]:
        s = f"prefill {row['prefill']:,} + {row['new_tokens']} greedy tokens"
    return f"{s}, batch {row['batch']}"


def table(rows: list[dict], meta: dict) -> str:
    lines = [(f"| | transformers s (torch {meta['torch']}, {meta['machine']['torch_threads']} threads) "
              f"| m1-jax s (jax {meta['jax']}) | transformers / m1-jax | m1-jax compile s | greedy tokens equal |"),
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {label(r)} | {r['transformers_s']:.3f} | {r['m1_jax_s']:.3f} | {r['ratio']:.2f}x "
                     f"| {r['m1_jax_compile_s']:.1f} | {r['agreement_pct']:.0f}% |")
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", type=int, default=2048, help="prompt tokens (default 2048)")
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens after the prompt (default 64)")
    ap.add_argument("--batch", type=int, default=8, help="the larger batch; batch 1 is always run (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case, the median reported (default 3)")
    ap.add_argument("--hidden", type=int, default=512, help="hidden size, 8 heads of hidden/8 (default 512)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    ap.add_argument("--experts", type=int, default=8, help="experts, top-2 (default 8)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    ap.add_argument("--block", type=int, default=256, help="lightning attention block size (default 256)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the weights and numpy seed of the prompts")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny config in seconds: " + ", ".join(f"{k} {v}" for k, v in SMOKE.items()))
    ap.add_argument("--out", default="bench_vs_transformers.json", help="JSON output (default %(default)s)")
    args = ap.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    for flag in ("prefill", "new_tokens", "batch", "repeats", "hidden", "layers", "experts", "vocab", "block"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.experts < 2:
        ap.error(f"--experts must be at least 2 (top-2 routing), got {args.experts}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cfg = hf_config(args)
    torch.manual_seed(args.seed)
    tf_model = transformers.MiniMaxForCausalLM(cfg).float().eval()
    n_params = sum(p.numel() for p in tf_model.parameters())
    with tempfile.TemporaryDirectory() as d:
        tf_model.save_pretrained(d)
        jx_model = m1_jax.from_pretrained(d)
    if jx_model.cfg.rotary_dim != jx_model.cfg.head_dim:
        sys.exit(f"the loaded model rotates {jx_model.cfg.rotary_dim} of {jx_model.cfg.head_dim} head dims; "
                 "transformers rotates the whole head")
    sides = Sides(tf_model, jx_model, args.new_tokens)
    meta = {"command": "python tools/bench_vs_transformers.py " + " ".join(argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
            "python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}
    model = {"parameters": n_params, "hidden": args.hidden, "layers": args.layers, "layer_types": cfg.layer_types,
             "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
             "intermediate": cfg.intermediate_size, "experts": args.experts, "top_k": 2, "vocab": args.vocab,
             "block": args.block, "dtype": "float32"}
    m = meta["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; torch {meta['torch']} ({m['torch_threads']} "
          f"threads), transformers {meta['transformers']}, jax {meta['jax']} ({m['jax_backend']}); {meta['date']}")
    print(f"model: {n_params / 1e6:.1f}M parameters, hidden {args.hidden}, {args.layers} layers "
          f"({cfg.layer_types.count('linear_attention')} lightning, {cfg.layer_types.count('full_attention')} "
          f"softmax), {cfg.num_attention_heads} heads x {cfg.head_dim}, {args.experts} experts top-2, "
          f"vocab {args.vocab}, block {args.block}, float32", flush=True)

    rng = np.random.default_rng(args.seed)
    check_len = min(args.prefill, 2 * args.block + 7)  # full lightning blocks and a partial one
    chk = check(sides, rng.integers(0, args.vocab, (CHECK_BATCH, check_len)).astype(np.int32))
    print(f"check, prompt {chk['prompt_shape']}: max |logits diff| {chk['max_abs_logits_diff']:.2e} (logits up to "
          f"{chk['max_abs_logits']:.2f}); greedy tokens equal {chk['agreement_pct']:.1f}% of "
          f"{CHECK_BATCH} x {CHECK_NEW_TOKENS}", flush=True)
    result = {"meta": meta, "model": model, "check": chk, "rows": []}
    if chk["agreement_pct"] < 100.0:
        print(f"transformers: {chk['transformers_tokens']}\nm1-jax:       {chk['m1_jax_tokens']}", file=sys.stderr)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"FAILED: the greedy tokens of the two models differ on the check prompt; nothing timed "
              f"(wrote {args.out})", file=sys.stderr)
        return 1

    prompts = rng.integers(0, args.vocab, (args.batch, args.prefill)).astype(np.int32)
    for batch in sorted({1, args.batch}):
        for kind in ("prefill", "prefill+decode"):
            row = run_case(sides, kind, prompts[:batch], args.repeats)
            result["rows"].append(row)
            print(f"{label(row)}: transformers {row['transformers_s']:.3f} s, m1-jax {row['m1_jax_s']:.3f} s "
                  f"(compile {row['m1_jax_compile_s']:.1f} s), {row['ratio']:.2f}x, greedy tokens equal "
                  f"{row['agreement_pct']:.0f}%", flush=True)
    print()
    print(table(result["rows"], meta))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
