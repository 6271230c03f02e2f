"""``m1 generate CKPT --prompt ...``: prefill + decode, printing tokens as they come (control characters
other than tab and newline escaped as ``\\xNN``)."""

from __future__ import annotations

import sys
import time

from m1_jax.commands.runtime import (add_model_arguments, add_sampling_arguments, announce_compile,
                                    load_config_and_tokenizer, load_model, sampling_params)


def add_arguments(p):
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (raw: no chat template unless --chat)")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of M1's chat template")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-turn token")
    p.add_argument("--stats", action="store_true", help="print timing to stderr at the end")
    add_sampling_arguments(p, max_new_tokens=64)


def _prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    else:
        text = args.prompt
        if args.chat:
            from m1_jax.chat import render

            text = render([{"role": "user", "content": args.prompt}])
        ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("--prompt is empty: give at least one token")
    return ids


def run(args) -> int:
    if args.prompt is not None and not args.prompt:
        raise ValueError("--prompt is empty: give at least one token")
    cfg, tokenizer = load_config_and_tokenizer(args)
    sp = sampling_params(args, cfg.vocab_size)
    ids = _prompt_ids(args, tokenizer)
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise ValueError(f"--prompt-ids: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    max_len = len(ids) + args.max_new_tokens
    if args.max_len is not None:
        if len(ids) > args.max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than --max-len {args.max_len}")
        if max_len - 1 > args.max_len:
            raise ValueError(f"--max-len {args.max_len} leaves room for {args.max_len - len(ids) + 1} new tokens "
                             f"after the {len(ids)}-token prompt, not --max-new-tokens {args.max_new_tokens}")
        max_len = args.max_len
    model = load_model(args)
    from m1_jax.generation import stream
    from m1_jax.tokenizer import StreamDecoder

    dec = StreamDecoder(tokenizer, escape_controls=True)
    eos = None if args.ignore_eos else tokenizer.eos_token_id
    announce_compile("generate", f"a {len(ids)}-token prompt")
    t0 = time.perf_counter()
    n, t_first = 0, None
    for tok, _ in stream(model, ids, max_new_tokens=args.max_new_tokens, temperature=sp.temperature,
                         top_k=sp.top_k or None, top_p=sp.top_p, seed=args.seed, eos_token_id=eos,
                         max_len=max_len, chunk_size=args.chunk_size):
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
        sys.stdout.write(dec.push(tok))
        sys.stdout.flush()
    sys.stdout.write(dec.flush() + "\n")
    if args.stats:
        t1 = time.perf_counter()
        rate = (n - 1) / (t1 - t_first) if n > 1 and t1 > t_first else float("nan")
        print(f"prompt {len(ids)} tokens, generated {n}; first token after {t_first - t0:.2f}s (with compile), "
              f"then {rate:.1f} tokens/s", file=sys.stderr)
    return 0
