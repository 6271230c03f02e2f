"""``m1 flops``: theoretical inference FLOPs against generation length, M1 versus a DeepSeek-R1-shaped
dense-attention model, as a table (and a PNG chart with ``--png``); see :mod:`m1_jax.flops`."""

from __future__ import annotations

import json


def add_arguments(p):
    p.add_argument("--config", default="minimax-m1-80k", help="M1 config (default: minimax-m1-80k)")
    p.add_argument("--max-tokens", type=int, default=131_072, help="longest generation length (default 128K)")
    p.add_argument("--png", metavar="OUT", help="write the chart to this PNG file (needs matplotlib: "
                                                "pip install 'm1-jax[plot]')")
    p.add_argument("--json", metavar="OUT", help="write the table as JSON")


def check_matplotlib(png: str) -> None:
    """``--png`` needs the optional ``[plot]`` extra: say so before any work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(f"--png {png}: the chart needs matplotlib, which is not installed: "
                         f"pip install 'm1-jax[plot]'") from None


def run(args) -> int:
    from m1_jax import flops
    from m1_jax.config import param_counts
    from m1_jax.presets import resolve_config

    if args.png:
        check_matplotlib(args.png)
    cfg = resolve_config(args.config)
    step = 8192
    lengths = sorted(set(list(range(0, args.max_tokens + 1, step)) + [k for k in flops.CLAIMS if k <= args.max_tokens]))
    rows = flops.table(cfg, lengths)
    print("Formula:\n" + flops.FORMULA + "\n")
    m1 = flops.m1_flop_model(cfg)
    counts = param_counts(cfg)
    print(f"N_active: {flops.ACTIVE_LABEL}\n  ({m1.name}: `m1 info` prints {counts['active'] / 1e9:.1f}B active per "
          f"token, excluding embedding and head; + {counts['lm_head'] / 1e9:.1f}B output head = "
          f"{m1.active_params / 1e9:.1f}B)")
    for model in (m1, flops.DEEPSEEK_R1):
        print(f"{model.name}: N_active {model.active_params / 1e9:.1f}B, {model.n_softmax} softmax layers "
              f"({model.heads} heads, d_qk {model.d_qk}, d_v {model.d_v}), {model.n_lightning} lightning layers: "
              f"F(t) = {model.constant / 1e9:.1f} GFLOP + {model.attn_per_context_token / 1e6:.3f} MFLOP * t")
    print()
    print(flops.format_table(rows))
    print()
    for g, claim in flops.CLAIMS.items():
        r = flops.table(cfg, [g])[0]
        print(f"at {g:,} generated tokens M1 needs {r['ratio_per_token']:.1%} of R1's FLOPs per token and "
              f"{r['ratio_cumulative']:.1%} of its total (published: {claim})")
    if args.png:
        flops.chart(cfg, args.png, args.max_tokens)
        print(f"chart written to {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"formula": flops.FORMULA, "rows": rows}, f, indent=2)
            f.write("\n")
    return 0
