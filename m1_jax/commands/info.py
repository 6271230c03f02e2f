"""``m1 info CONFIG``: architecture and parameter counts, computed from the config."""

from __future__ import annotations

import json

from m1_jax.config import M1Config, describe, param_counts
from m1_jax.presets import resolve_config


def add_arguments(p):
    p.add_argument("config", help="a config.json, a checkpoint directory, or a preset name "
                                  "(e.g. minimax-m1-40k, tiny)")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")


def run(args) -> int:
    cfg: M1Config = resolve_config(args.config)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "params": param_counts(cfg)}, indent=2))
    else:
        print(describe(cfg))
    return 0
