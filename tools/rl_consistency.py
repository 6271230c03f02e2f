"""Train/inference consistency of RL log-probs (the MiniMax-M1 report's figure 3) on this machine.

Samples responses with :func:`m1_jax.rl.rollout.rollout` (the behaviour log-probs come from ``generate``: prefill,
then one cached decode step per token) and recomputes the log-probs of the same tokens with the update step's
full-sequence forward (:func:`m1_jax.rl.update.policy_logprobs`), with the same weights and the same compute and
output-head dtypes on both sides, for bf16 compute with a float32 head, bf16 compute with a bf16 head, and
float32 / float32 (the reference). Prints, over the sampled tokens, the Pearson correlation of the two
(:func:`m1_jax.rl.consistency.logprob_agreement`), their mean and max absolute difference, and the token count.

The model: ``--init-from CKPT`` (any checkpoint :func:`m1_jax.from_pretrained` loads, e.g. an ``m1 train``
workdir), else the ``--config`` preset trained ``--train-steps`` steps with the ``train-demo`` run config (the
Python standard library as bytes, one device) in a temporary workdir. ``--train-steps 0`` keeps the random
init, whose near-uniform distributions make the figure say little.

    python tools/rl_consistency.py                          # tiny, trained 150 steps first (CPU)
    python tools/rl_consistency.py --init-from runs/demo    # an `m1 train` workdir
    JAX_PLATFORMS=cuda python tools/rl_consistency.py       # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.checkpoint_io.locate import locate
from m1_jax.loading import from_pretrained
from m1_jax.model import init_model
from m1_jax.presets import resolve_config
from m1_jax.rl.consistency import logprob_agreement
from m1_jax.rl.rollout import rollout
from m1_jax.rl.update import policy_logprobs
from m1_jax.run_config import load_run_config
from m1_jax.tokenizer import load_tokenizer
from m1_jax.train_loop import fit

# (compute dtype, head dtype) of each row; the last is the float32 reference.
CASES = (("bfloat16", "float32"), ("bfloat16", "bfloat16"), ("float32", "float32"))
# Beginnings of Python source (what the train-demo model learnt), one group of responses each.
PROMPTS = ("def ", "import ", "class ", "    return ", "for i in range(", "if __name__ == ", "with open(", "self.")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init-from", metavar="CKPT", help="a checkpoint to measure (default: train one first)")
    ap.add_argument("--config", default="tiny", help="model preset or config.json to train (default %(default)s)")
    ap.add_argument("--train-steps", type=int, default=150,
                    help="train-demo steps before measuring, without --init-from; 0: the random init (default 150)")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS),
                    help=f"how many of the {len(PROMPTS)} built-in prompts (default all)")
    ap.add_argument("--group-size", type=int, default=4, help="responses per prompt (default 4)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens per response (default 64)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling and of a random init (default 0)")
    ap.add_argument("--out", help="also write the rows and the setup as JSON here")
    ap.add_argument("--cases", default=",".join(f"{c}/{h}" for c, h in CASES),
                    help="COMPUTE/HEAD dtype pairs to measure (default: %(default)s)")
    args = ap.parse_args(argv)
    args.cases = [tuple(c.split("/")) for c in args.cases.split(",") if c]
    unknown = ["/".join(c) for c in args.cases if c not in CASES]
    if unknown or not args.cases:
        ap.error(f"--cases: {', '.join(unknown) or 'none given'}: choose from "
                 f"{', '.join(f'{c}/{h}' for c, h in CASES)}")
    for flag, value, lo in (("--train-steps", args.train_steps, 0), ("--prompts", args.prompts, 1),
                            ("--group-size", args.group_size, 1), ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < lo:
            ap.error(f"{flag} must be >= {lo}, got {value}")
    if args.prompts > len(PROMPTS):
        ap.error(f"--prompts: there are {len(PROMPTS)} built-in prompts, got {args.prompts}")
    if not args.temperature > 0:
        ap.error(f"--temperature must be > 0 (sampled responses), got {args.temperature}")
    if args.init_from and not os.path.exists(args.init_from):
        ap.error(f"--init-from {args.init_from}: no such checkpoint directory")
    return args


@nnx.jit
def update_logprobs(model, tokens):
    return policy_logprobs(model, tokens)[0]


def measure(load, prompts: list[list[int]], args) -> list[dict]:
    """One row per ``args.cases`` entry (:data:`CASES` by default): ``load(dtype, head_dtype)`` gives the model
    both paths use."""
    rows = []
    for compute, head in args.cases:
        model = load(jnp.dtype(compute), jnp.dtype(head))
        t0 = time.perf_counter()
        r = rollout(model, prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, seed=args.seed)
        logp = np.asarray(update_logprobs(model, jnp.asarray(r.tokens)))
        # policy_logprobs covers tokens[:, 1:]; position 0 is a prompt token, never in the response mask
        row = logprob_agreement(r.logprobs[:, 1:], logp, r.response_mask[:, 1:])
        rows.append({"compute": compute, "head": head, **row, "seconds": time.perf_counter() - t0})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| compute | head | correlation | 1 - correlation | mean abs diff | max abs diff | tokens |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['compute']} | {r['head']} | {r['correlation']:.6f} | {1 - r['correlation']:.2e} | "
              f"{r['mean_abs_diff']:.2e} | {r['max_abs_diff']:.2e} | {r['tokens']} |" for r in rows]
    return "\n".join(lines)


def trained_checkpoint(args, workdir: str) -> dict:
    """Trains ``--config`` for ``--train-steps`` with the train-demo run config into ``workdir``; its loss."""
    run = load_run_config("train-demo", [f"model.config={args.config}", f"train.steps={args.train_steps}",
                                         f"train.checkpoint_every={args.train_steps}", "train.sample_tokens=0",
                                         "train.async_checkpointing=false", "train.mesh=data=1"])
    summary = fit(run, workdir, progress=False)
    return {"train_steps": summary.steps, "final_loss": summary.losses[-1], "train_s": summary.wall_s}


def run(args) -> tuple[list[dict], dict]:
    setup = {"prompts": args.prompts, "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
             "temperature": args.temperature, "seed": args.seed, "backend": jax.default_backend()}
    with tempfile.TemporaryDirectory(prefix="rl-consistency-") as tmp:
        if args.init_from:
            source = args.init_from
            setup["model"] = f"checkpoint {source}"
        elif args.train_steps:
            source = os.path.join(tmp, "run")
            setup.update(trained_checkpoint(args, source))
            setup["model"] = f"{args.config}, trained {args.train_steps} train-demo steps"
        else:
            source = None
            setup["model"] = f"{args.config}, random init (seed {args.seed})"
        if source is None:
            cfg = resolve_config(args.config)
            tokenizer = load_tokenizer(None, cfg.vocab_size)

            def load(dtype, head):
                return init_model(cfg, seed=args.seed, dtype=dtype, head_dtype=head)
        else:
            def load(dtype, head):
                return from_pretrained(source, dtype=dtype, head_dtype=head)

            tokenizer = load_tokenizer(source, locate(source).config().vocab_size)
        prompts = [tokenizer.encode(p) for p in PROMPTS[:args.prompts]]
        rows = measure(load, prompts, args)
    return rows, setup


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rows, setup = run(args)
    except CheckpointError as e:
        raise SystemExit(f"error: --init-from: {e}") from None
    print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in setup.items()))
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"setup": setup, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    if "JAX_PLATFORMS" not in os.environ:  # CPU unless asked otherwise, as the other tools (before any device use)
        jax.config.update("jax_platforms", "cpu")
    raise SystemExit(main())
