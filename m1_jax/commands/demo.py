"""``m1 demo``: the ``tiny`` preset with random weights: one forward, a greedy continuation.

The prompt is random: printable bytes for a byte-level vocabulary (<= 1024 ids, the tiny presets),
random ids otherwise. Prompt and continuation print as text (control bytes escaped), or as ids when
the vocabulary has no byte-level tokenizer.
"""

from __future__ import annotations

import time

MAX_SEED = 2 ** 32


def add_arguments(p):
    p.add_argument("--config", default="tiny", help="preset name or config.json (default: tiny)")
    p.add_argument("--prompt-len", type=int, default=24, help="tokens in the random prompt (default: 24)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens of greedy continuation (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt (default: 0)")


def token_text(tokenizer, ids) -> str:
    """``ids`` as text with control bytes escaped; as ``ids [...]`` without a (byte-level) tokenizer."""
    from m1_jax.tokenizer import escape_controls

    ids = [int(i) for i in ids]
    return f"ids {ids}" if tokenizer is None else escape_controls(tokenizer.decode(ids))


def check_flags(args, cfg) -> None:
    """Flag errors before anything is built; messages name the flag."""
    if args.prompt_len < 1:
        raise ValueError(f"--prompt-len must be >= 1, got {args.prompt_len}")
    if args.new_tokens < 1:
        raise ValueError(f"--new-tokens must be >= 1, got {args.new_tokens}")
    if not 0 <= args.seed < MAX_SEED:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    total = args.prompt_len + args.new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} is {total} tokens, more "
                         f"than the {cfg.max_position_embeddings} positions of the model")


def run(args) -> int:
    # Lazy: JAX loads when the demo runs, not when the command line is parsed (``m1 demo --help``).
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from m1_jax.config import describe
    from m1_jax.model import init_model
    from m1_jax.presets import resolve_config
    from m1_jax.tokenizer import TokenizerError, load_tokenizer

    cfg = resolve_config(args.config)
    check_flags(args, cfg)
    try:
        tokenizer = load_tokenizer(None, cfg.vocab_size)  # byte-level, for vocabularies of 260..1024 ids
    except TokenizerError:
        tokenizer = None  # the ids are shown instead
    print(describe(cfg))
    model = init_model(cfg, seed=args.seed)
    forward = nnx.jit(lambda m, ids: m(ids))
    rng = np.random.default_rng(args.seed)
    if tokenizer is not None:
        prompt = rng.integers(ord(" "), ord("~") + 1, args.prompt_len)
        what = "random printable bytes"
    else:
        prompt = rng.integers(0, cfg.vocab_size, args.prompt_len)
        what = "random ids"
    ids = jnp.asarray(prompt[None], jnp.int32)
    print(f"\nprompt ({args.prompt_len} tokens, {what}): {token_text(tokenizer, prompt)}")
    t0 = time.perf_counter()
    logits = jax.block_until_ready(forward(model, ids))
    print(f"forward: ids {list(ids.shape)} -> logits {list(logits.shape)} {logits.dtype} "
          f"in {time.perf_counter() - t0:.2f}s (with compile); finite: {bool(jnp.isfinite(logits).all())}")
    # Greedy continuation by full re-forward over a fixed-size buffer (one compile for all steps).
    total = args.prompt_len + args.new_tokens
    buf = jnp.zeros((1, total), jnp.int32).at[:, : args.prompt_len].set(ids)
    step = nnx.jit(lambda m, b, n: jnp.argmax(m(b)[0, n - 1]).astype(jnp.int32))
    t0 = time.perf_counter()
    for n in range(args.prompt_len, total):
        buf = buf.at[0, n].set(step(model, buf, n))
    new = np.asarray(buf[0, args.prompt_len:])
    print(f"greedy continuation ({args.new_tokens} tokens, random weights, {time.perf_counter() - t0:.2f}s): "
          f"{token_text(tokenizer, new)}")
    return 0
