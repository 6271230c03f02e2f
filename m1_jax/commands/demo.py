"""``m1 demo``: the ``tiny`` preset with random weights: one forward, a greedy continuation."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1_jax.config import describe
from m1_jax.model import init_model
from m1_jax.presets import resolve_config


def add_arguments(p):
    p.add_argument("--config", default="tiny", help="preset name or config.json (default: tiny)")
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    cfg = resolve_config(args.config)
    print(describe(cfg))
    model = init_model(cfg, seed=args.seed)
    forward = nnx.jit(lambda m, ids: m(ids))
    rng = np.random.default_rng(args.seed)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, args.prompt_len)), jnp.int32)
    t0 = time.perf_counter()
    logits = jax.block_until_ready(forward(model, ids))
    print(f"\nforward: ids {list(ids.shape)} -> logits {list(logits.shape)} {logits.dtype} "
          f"in {time.perf_counter() - t0:.2f}s (with compile); finite: {bool(jnp.isfinite(logits).all())}")
    # Greedy continuation by full re-forward over a fixed-size buffer (one compile for all steps).
    total = args.prompt_len + args.new_tokens
    buf = jnp.zeros((1, total), jnp.int32).at[:, : args.prompt_len].set(ids)
    step = nnx.jit(lambda m, b, n: jnp.argmax(m(b)[0, n - 1]).astype(jnp.int32))
    t0 = time.perf_counter()
    for n in range(args.prompt_len, total):
        buf = buf.at[0, n].set(step(model, buf, n))
    new = np.asarray(buf[0, args.prompt_len:])
    print(f"greedy continuation ({args.new_tokens} tokens, random weights): {new.tolist()} "
          f"in {time.perf_counter() - t0:.2f}s")
    return 0
