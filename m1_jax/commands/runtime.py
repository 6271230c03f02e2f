"""What ``m1 generate`` and ``m1 chat`` share: checkpoint + tokenizer loading and the sampling flags."""

from __future__ import annotations

import sys

from m1_jax.quant.options import add_quantize_arguments, quantize_option
from m1_jax.sampling import SamplingArgumentError, SamplingParams

CHECKPOINT_HELP = ("checkpoint directory: Hugging Face (config.json + safetensors), an 'm1 convert' output "
                   "(Orbax), or an 'm1 train' workdir (its latest step) or step directory WORKDIR/checkpoints/N")


def add_model_arguments(p):
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    add_checkpoint_options(p)
    p.add_argument("--max-len", type=int, default=None,
                   help="cache length in tokens (default: prompt + --max-new-tokens; chat: 4096)")
    p.add_argument("--chunk-size", type=int, default=2048, help="prefill chunk length (bounds prefill memory)")


def add_checkpoint_options(p):
    """How a checkpoint is read: compute dtype, tokenizer, verification."""
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--tokenizer", default=None,
                   help="a directory holding tokenizer.json, the file itself, or 'byte' (default: the "
                        "checkpoint's: its tokenizer.json, a training run's data.tokenizer; byte-level for "
                        "vocabularies <= 1024)")
    p.add_argument("--verify", action="store_true",
                   help="check every array of an 'm1 convert' output against the checksums its conversion "
                        "recorded before using it (reads the checkpoint once more)")
    add_quantize_arguments(p)


def add_sampling_arguments(p, max_new_tokens: int):
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"stop after this many new tokens (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0; unused when greedy)")


def sampling_params(args, vocab_size: int) -> SamplingParams:
    """The length and sampling flags, validated before any model is loaded; messages name the flag.
    ``--temperature`` / ``--top-k`` / ``--top-p`` go through :meth:`SamplingParams.create`, as
    ``m1_jax.generate`` does."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.max_len is not None and args.max_len < 1:
        raise ValueError(f"--max-len must be >= 1, got {args.max_len}")
    try:
        return SamplingParams.create(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     vocab_size=vocab_size)
    except SamplingArgumentError as e:  # the flag is the argument's name with dashes
        raise ValueError(f"--{e.argument.replace('_', '-')} {e.problem}") from None


def announce_compile(command: str, what: str) -> None:
    """One line on stderr before the first prefill: compiling takes seconds to minutes and shows nothing."""
    print(f"m1 {command}: compiling the model for {what} (first call only) ...", file=sys.stderr, flush=True)


def load_config_and_tokenizer(args):
    """(config, tokenizer) of ``args.checkpoint``: cheap, so that bad input fails before the weights load."""
    # imported here: the config and tokenizer load without JAX, which only load_model brings in
    from m1_jax.checkpoint_io.locate import BYTE_TOKENIZER, locate
    from m1_jax.tokenizer import ByteTokenizer, TokenizerError, load_tokenizer

    ckpt = locate(args.checkpoint)
    cfg = ckpt.config()
    spec = args.tokenizer or ckpt.tokenizer
    if spec == BYTE_TOKENIZER:
        return cfg, ByteTokenizer(cfg.vocab_size)
    try:  # a --tokenizer that holds no tokenizer.json is an error, not a silent byte-level fallback
        return cfg, load_tokenizer(spec, cfg.vocab_size, required=args.tokenizer is not None)
    except TokenizerError as e:
        raise TokenizerError(f"--tokenizer {e}" if args.tokenizer is not None else str(e)) from None


def load_model(args, mesh=None):
    import jax.numpy as jnp

    from m1_jax.loading import from_pretrained

    return from_pretrained(args.checkpoint, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
                           verify=args.verify, mesh=mesh, quantize=quantize_option(args))
