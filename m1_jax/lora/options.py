"""The command-line flag of LoRA, shared by the commands that train or plan a fine-tune (no JAX)."""

from __future__ import annotations

from m1_jax.lora.spec import parse_flag

HELP = ("adapters of rank R scaled by A/R on the targets (attention, experts, all, or weight names: qkv_proj "
        "output_gate out_proj q_proj k_proj v_proj o_proj w1 w3 w2); the base weights frozen (base=int8: with "
        "int8 experts, QLoRA); optimizer state only for the adapters (docs/lora.md)")


def add_lora_argument(p, what: str) -> None:
    p.add_argument("--lora", default=None, metavar="rank=R,alpha=A,targets=T[,T...][,base=int8]",
                   help=f"{what}: {HELP}")


def lora_overrides(args) -> list[str]:
    """``--lora`` as run-config overrides (``lora.rank=8``, ...); none without the flag."""
    return [f"lora.{k}={v}" for k, v in parse_flag(args.lora).items()] if args.lora else []
