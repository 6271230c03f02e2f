"""The ``m1`` command line: one subcommand per module in :mod:`m1_jax.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``m1 --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from m1_jax import distributed

VERBOSE_HELP = "debug logging, and the TPU runtime's own messages on a host without TPUs"

# subcommand -> (module, one-line help)
COMMANDS = {
    "info": ("m1_jax.commands.info", "print the architecture and parameter counts of a config"),
    "demo": ("m1_jax.commands.demo", "build the tiny preset, run a forward and a greedy continuation"),
    "convert": ("m1_jax.commands.convert", "convert a Hugging Face / PyTorch checkpoint to an Orbax checkpoint (streaming)"),
    "export": ("m1_jax.commands.export", "export a converted checkpoint to Hugging Face safetensors shards"),
    "generate": ("m1_jax.commands.generate", "generate text from a prompt (streaming)"),
    "chat": ("m1_jax.commands.chat", "interactive chat in M1's template, with tools"),
    "train": ("m1_jax.commands.train", "train or fine-tune (default: a tiny hybrid M1 on the Python stdlib's source)"),
    "rl": ("m1_jax.commands.rl", "reinforcement learning with verifiable rewards: CISPO (or GRPO, DAPO) on rollouts"),
    "serve": ("m1_jax.commands.serve", "an OpenAI-compatible server: continuous batching, exact prefix cache, tools"),
    "aot": ("m1_jax.commands.aot", "compile for a TPU topology on this host: per-device memory, HBM fit, FLOPs"),
    "flops": ("m1_jax.commands.flops", "inference FLOPs vs generation length: M1 against a DeepSeek-R1-shaped model"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m1", description="MiniMax-M1 in JAX: run, convert, train, plan.")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    # -v after the command too; SUPPRESS keeps the subcommand from resetting a -v given before it
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, parents=[verbose])
        if name == chosen:  # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        distributed.quiet_absent_tpu()
    mod = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(mod.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no trace
        if args.verbose:
            raise
        print(f"m1 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
