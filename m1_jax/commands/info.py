"""``m1 info CONFIG``: architecture and parameter counts, computed from the config."""

from __future__ import annotations

import json

from m1_jax.config import M1Config, describe, param_counts
from m1_jax.presets import resolve_config
from m1_jax.quant.layout import weight_bytes
from m1_jax.quant.spec import QuantConfig

# what the weights take: all bf16 (the router float32), int8 experts, int8 experts and attention projections
WEIGHT_FORMS = {"bf16": None, "int8 experts": QuantConfig(), "int8 experts + attention": QuantConfig(attention=True)}


def add_arguments(p):
    p.add_argument("config", help="a config.json, a checkpoint directory, or a preset name "
                                  "(e.g. minimax-m1-40k, tiny)")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")


def run(args) -> int:
    cfg: M1Config = resolve_config(args.config)
    sizes = {form: weight_bytes(cfg, "bfloat16", qc) for form, qc in WEIGHT_FORMS.items()}
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "params": param_counts(cfg), "weight_bytes": sizes}, indent=2))
    else:
        print(describe(cfg))
        print("weight bytes          " + "; ".join(f"{form} {n / 2**30:,.2f} GiB" for form, n in sizes.items()))
    return 0
