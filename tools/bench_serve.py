"""Load test of ``m1 serve``: throughput, time to first token and time per output token at several
concurrencies, with random or shared-prefix prompts, with and without the prefix cache.

Each request is a streamed ``/v1/completions`` call (``ignore_eos``, ``logprobs: 0`` so that every token
arrives as its own event) of ``--max-tokens`` tokens at temperature 0. Per concurrency level C, C clients
send ``--requests`` requests in all, each client starting its next request when its last one ends.

* output tokens/s = completion tokens of the level / its wall time;
* TTFT = request sent -> first token event; TPOT = (last token - first token) / (tokens - 1), per request;
  p50 / p99 over the level's requests.

Prompts: ``random`` (``--prompt-len`` random printable characters, a different prompt per request) or
``shared`` (one ``--prefix-len``-character prefix, then a unique ``--suffix-len``-character suffix). With
the byte-level tokenizer of the tiny models a character is a token.

Without ``--url`` the tool starts ``m1 serve`` itself (CHECKPOINT, or the tiny preset with random weights)
twice, with the prefix cache on (``--prefix-cache-gb``) and off, on free local ports, and runs the same
levels against each. With ``--url`` it measures that running server once.

    JAX_PLATFORMS=cpu python tools/bench_serve.py                                   # tiny, both prompt kinds
    python tools/bench_serve.py --url http://127.0.0.1:8000 --model NAME --prompts shared
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import string
import subprocess
import sys
import time

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_moe import cpu_name  # noqa: E402  (a sibling tool: the machine line)


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + " ") for _ in range(n))


def prompts(kind: str, count: int, args, seed: int) -> list[str]:
    rng = random.Random(seed)
    if kind == "random":
        return [_text(rng, args.prompt_len) for _ in range(count)]
    prefix = _text(random.Random(0), args.prefix_len)
    return [prefix + _text(rng, args.suffix_len) for _ in range(count)]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logprobs": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    times = []
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:300]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for c in chunk["choices"]:
                if c.get("logprobs"):
                    times.extend([time.perf_counter()] * len(c["logprobs"]["tokens"]))
    if len(times) != max_tokens:
        raise RuntimeError(f"expected {max_tokens} tokens, got {len(times)}")
    return {"ttft": times[0] - t0, "tpot": (times[-1] - times[0]) / max(1, len(times) - 1), "tokens": len(times),
            "end": times[-1]}


async def level(url: str, model: str, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    queue = list(reversed(texts))
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            while queue:
                results.append(await one_request(client, url, model, queue.pop(), max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ttft = np.array([r["ttft"] for r in results]) * 1e3
    tpot = np.array([r["tpot"] for r in results]) * 1e3
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "tpot_p50_ms": float(np.percentile(tpot, 50)), "tpot_p99_ms": float(np.percentile(tpot, 99))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started_server(args, prefix_cache_gb: float):
    """``m1 serve`` in a subprocess; yields (url, model name) once /health answers."""
    port = _free_port()
    cmd = [sys.executable, "-m", "m1_jax.cli", "serve", *([args.checkpoint] if args.checkpoint else []),
           "--port", str(port), "--slots", str(args.slots), "--max-context", str(args.max_context),
           "--prefill-chunk", str(args.prefill_chunk), "--prefix-cache-gb", str(prefix_cache_gb),
           "--max-queue", str(max(256, args.requests)), "--log-level", "warning"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True,
                            cwd=args.workdir or os.getcwd())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"m1 serve exited: {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("m1 serve did not come up in 10 minutes")
            time.sleep(0.2)
        yield url, httpx.get(url + "/v1/models").json()["data"][0]["id"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure(url: str, model: str, args, cache: str) -> list[dict]:
    rows = []
    for kind in args.prompts:
        # warm-up: compiles every prefill chunk length and the decode step (and fills the cache with the prefix)
        asyncio.run(level(url, model, prompts(kind, 2, args, seed=10_000), 1, args.max_tokens))
        for c in args.concurrency:
            n = max(args.requests, c)
            r = asyncio.run(level(url, model, prompts(kind, n, args, seed=c), c, args.max_tokens))
            r.update(prompts=kind, prefix_cache=cache)
            rows.append(r)
            print(f"  {cache:>3} {kind:>6} c={c:<3} {r['tokens_per_s']:8.1f} tok/s  ttft p50 {r['ttft_p50_ms']:.1f} ms",
                  file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", default=None, help="served when the tool starts m1 serve itself")
    ap.add_argument("--url", default=None, help="a running server (default: start m1 serve, cache on and off)")
    ap.add_argument("--model", default=None, help="model name for --url (default: the server's first)")
    ap.add_argument("--prompts", nargs="+", choices=("random", "shared"), default=["random", "shared"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=64, help="requests per level (at least its concurrency)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128, help="random prompts' length in characters")
    ap.add_argument("--prefix-len", type=int, default=2048, help="shared prompts' common prefix")
    ap.add_argument("--suffix-len", type=int, default=16, help="shared prompts' own suffix")
    ap.add_argument("--slots", type=int, default=32, help="when starting m1 serve")
    ap.add_argument("--max-context", type=int, default=4096, help="when starting m1 serve")
    ap.add_argument("--prefill-chunk", type=int, default=256, help="when starting m1 serve")
    ap.add_argument("--prefix-cache-gb", type=float, default=1.0, help="when starting m1 serve (cache on)")
    ap.add_argument("--workdir", default=None, help="where m1 serve runs (its runs/ is the default checkpoint)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    for flag in ("requests", "max_tokens", "prompt_len", "prefix_len", "suffix_len", "slots"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be positive")
    if min(args.concurrency) < 1:
        ap.error("--concurrency must be positive")
    rows = []
    if args.url:
        model = args.model or httpx.get(args.url + "/v1/models").json()["data"][0]["id"]
        rows += measure(args.url.rstrip("/"), model, args, "?")
    else:
        for cache, gb in (("on", args.prefix_cache_gb), ("off", 0.0)):
            with started_server(args, gb) as (url, model):
                rows += measure(url, model, args, cache)
    print(f"{cpu_name()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d', time.gmtime())}; "
          f"{args.max_tokens} tokens per request, {args.requests} requests per level"
          + ("" if args.url else f", {args.slots} slots, prefill chunk {args.prefill_chunk}") + "\n")
    print("| prompts | prefix cache | concurrency | output tok/s | vs c=1 | TTFT p50 / p99 ms | TPOT p50 / p99 ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        base = next(b for b in rows if (b["prompts"], b["prefix_cache"]) == (r["prompts"], r["prefix_cache"]))
        print(f"| {r['prompts']} | {r['prefix_cache']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.1f}x | {r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | "
              f"{r['tpot_p50_ms']:.2f} / {r['tpot_p99_ms']:.2f} |")
    hit = next((r for r in rows if r["prompts"] == "shared" and r["prefix_cache"] == "on"), None)
    miss = next((r for r in rows if r["prompts"] == "shared" and r["prefix_cache"] == "off"), None)
    if hit and miss and hit["concurrency"] == miss["concurrency"]:
        print(f"\nshared {args.prefix_len}-token prefix at concurrency {hit['concurrency']}: TTFT p50 "
              f"{miss['ttft_p50_ms']:.1f} ms without the prefix cache (every prompt prefilled) vs "
              f"{hit['ttft_p50_ms']:.1f} ms with it (hits): {miss['ttft_p50_ms'] / hit['ttft_p50_ms']:.1f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
