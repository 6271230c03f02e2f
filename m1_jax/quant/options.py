"""The command-line flags of int8 weights, shared by the commands that load or plan a model (no JAX)."""

from __future__ import annotations

from m1_jax.quant.spec import QuantConfig, resolve


def add_quantize_arguments(p, help_text: str = "run the experts' weights in int8 (per-output-channel scales; "
                                                 "docs/quantization.md)") -> None:
    p.add_argument("--quantize", choices=("none", "int8"), default="none", help=help_text)
    p.add_argument("--quantize-attention", action="store_true",
                   help="with --quantize int8: the attention projections in int8 too")


def quantize_option(args) -> QuantConfig | None:
    """``--quantize`` / ``--quantize-attention`` -> a config (None: full precision); the error names the flag."""
    if args.quantize_attention and args.quantize != "int8":
        raise ValueError("--quantize-attention needs --quantize int8")
    return resolve(args.quantize, args.quantize_attention or None)
