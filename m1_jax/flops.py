"""Theoretical inference FLOPs against generation length: M1 versus a dense-attention model shaped like
DeepSeek-R1.

Generating the token at position ``t`` (``t`` tokens already in context) costs, in FLOPs
(one multiply-add = 2 FLOPs):

    F(t) = 2 * N_active                                       weight matmuls (MoE: the top-k experts)
         + n_softmax * 2 * H * (d_qk + d_v) * t               softmax attention: q.K^T and p.V over t keys
         + n_lightning * 5 * H * d_k * d_v                    lightning: S = e^-s S + k^T v (3 H d d), o = q S (2 H d d)

Generating ``G`` tokens from an empty context costs ``C(G) = sum_{t<G} F(t)
= G * (2 N_active + lightning) + A * G (G - 1) / 2`` with ``A = n_softmax * 2 H (d_qk + d_v)``.

For M1 ``N_active`` is the per-token parameter count of :func:`m1_jax.config.param_counts` (45.9B,
attention, norms, router and two experts) plus the untied output head (6144 x 200064); 10 of its 80
layers are softmax attention (64 heads of 128), the other 70 lightning. The comparison model has
DeepSeek-R1's shape: 37B active parameters and 61 layers of softmax attention with 128 heads,
q.k dimension 192 and v dimension 128 (MLA in its un-absorbed form). Element-wise work (norms,
softmax exponentials, RoPE) is left out of both.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from m1_jax.config import M1Config, param_counts

FORMULA = (
    "F(t) = 2*N_active + n_softmax*2*H*(d_qk+d_v)*t + n_lightning*5*H*d_k*d_v   (FLOPs for the token at position t)\n"
    "C(G) = G*(2*N_active + n_lightning*5*H*d_k*d_v) + n_softmax*2*H*(d_qk+d_v)*G*(G-1)/2   (G tokens generated)"
)

# What N_active counts (the label `m1 flops` prints; `m1 info` counts without the head).
ACTIVE_LABEL = "active parameters per token, including the output head, excluding the embedding (a lookup)"

# Published claim (MiniMax-M1 report): M1 needs under 50% of DeepSeek-R1's FLOPs at 64K generated tokens
# and about 25% at 100K.
CLAIMS = {64_000: "< 50%", 100_000: "about 25%"}


@dataclasses.dataclass(frozen=True)
class FlopModel:
    name: str
    active_params: float  # weights one token multiplies (including the output head)
    n_softmax: int
    n_lightning: int
    heads: int
    d_qk: int
    d_v: int

    @property
    def attn_per_context_token(self) -> float:
        """FLOPs added to one token's cost per token of context (the slope of F)."""
        return self.n_softmax * 2 * self.heads * (self.d_qk + self.d_v)

    @property
    def constant(self) -> float:
        """Per-token FLOPs independent of the context length."""
        return 2 * self.active_params + self.n_lightning * 5 * self.heads * self.d_qk * self.d_v

    def per_token(self, t) -> np.ndarray:
        return self.constant + self.attn_per_context_token * np.asarray(t, np.float64)

    def cumulative(self, g) -> np.ndarray:
        g = np.asarray(g, np.float64)
        return g * self.constant + self.attn_per_context_token * g * (g - 1) / 2


def step_flops(cfg: M1Config, mode: str, *, batch: int, seq_len: int, context: int) -> float:
    """Model FLOPs of one step (all devices): ``forward`` over ``batch x seq_len`` tokens (causal
    attention: sum of F(t) over the positions), ``train`` = 3 x forward (backward = 2 x forward; a
    rematerialised forward is not counted), ``decode`` = one token per row at position ``context``,
    ``prefill`` = the last ``seq_len``-token chunk of a ``context``-token prompt."""
    m = m1_flop_model(cfg)
    if mode == "decode":
        return batch * float(m.per_token(context))
    if mode == "prefill":
        return batch * float(m.cumulative(context) - m.cumulative(context - seq_len))
    fwd = batch * float(m.cumulative(seq_len))
    return 3 * fwd if mode == "train" else fwd


def m1_flop_model(cfg: M1Config) -> FlopModel:
    c = param_counts(cfg)
    return FlopModel(name="MiniMax-M1", active_params=c["active"] + c["lm_head"],
                     n_softmax=cfg.num_softmax_layers, n_lightning=cfg.num_lightning_layers,
                     heads=cfg.num_attention_heads, d_qk=cfg.head_dim, d_v=cfg.head_dim)


DEEPSEEK_R1 = FlopModel(name="DeepSeek-R1 shape", active_params=37e9, n_softmax=61, n_lightning=0, heads=128,
                        d_qk=192, d_v=128)


def table(cfg: M1Config, lengths) -> list[dict]:
    m1 = m1_flop_model(cfg)
    rows = []
    for g in lengths:
        a_tok, b_tok = float(m1.per_token(g)), float(DEEPSEEK_R1.per_token(g))
        a_cum, b_cum = float(m1.cumulative(g)), float(DEEPSEEK_R1.cumulative(g))
        rows.append({"tokens": int(g), "m1_per_token": a_tok, "r1_per_token": b_tok, "ratio_per_token": a_tok / b_tok,
                     "m1_cumulative": a_cum, "r1_cumulative": b_cum,
                     "ratio_cumulative": a_cum / b_cum if b_cum else float("nan")})
    return rows


def format_table(rows) -> str:
    out = [f"{'generated':>10} {'M1 GFLOP/tok':>13} {'R1 GFLOP/tok':>13} {'ratio':>6} "
           f"{'M1 total PFLOP':>15} {'R1 total PFLOP':>15} {'ratio':>6}"]
    for r in rows:
        ratio_c = "-" if r["tokens"] == 0 else f"{r['ratio_cumulative']:.1%}"
        out.append(f"{r['tokens']:>10,} {r['m1_per_token'] / 1e9:>13.1f} {r['r1_per_token'] / 1e9:>13.1f} "
                   f"{r['ratio_per_token']:>6.1%} {r['m1_cumulative'] / 1e15:>15.2f} "
                   f"{r['r1_cumulative'] / 1e15:>15.2f} {ratio_c:>6}")
    return "\n".join(out)


def chart(cfg: M1Config, path: str, max_tokens: int = 131_072) -> None:
    """PNG: per-token and cumulative FLOPs of both models against generation length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m1 = m1_flop_model(cfg)
    g = np.linspace(0, max_tokens, 257)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model, style in ((m1, "-"), (DEEPSEEK_R1, "--")):
        ax1.plot(g / 1024, model.per_token(g) / 1e9, style, label=model.name)
        ax2.plot(g / 1024, model.cumulative(g) / 1e15, style, label=model.name)
    ax1.set(title="FLOPs per generated token", xlabel="generation length (K tokens)", ylabel="GFLOP / token")
    ax2.set(title="FLOPs to generate the whole sequence", xlabel="generation length (K tokens)", ylabel="PFLOP")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
