"""Model configuration: one frozen dataclass, read from and written to HF ``config.json``.

Two spellings of the same architecture exist in the wild:

* the original MiniMax-M1 / Text-01 remote code (``attn_type_list``, ``layernorm_*_alpha``,
  ``rotary_dim``, ``postnorm``, ...), which is what the released checkpoints carry;
* transformers' native ``minimax`` class (``layer_types``, ``*_alpha_factor``,
  ``rope_parameters``, ...), which is what ``save_pretrained`` writes.

:meth:`M1Config.from_dict` reads both; :meth:`M1Config.to_dict` writes the original format.
Anything the model cannot run is rejected with a :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

LINEAR = "linear_attention"
FULL = "full_attention"
LAYER_TYPES = (LINEAR, FULL)
# attn_type_list codes of the original config.
_ATTN_TYPE_CODES = {0: LINEAR, 1: FULL}

# Original field name -> dataclass field, for the six DeepNorm residual factors.
_ORIG_RESIDUAL_FIELDS = {
    "layernorm_full_attention_alpha": "full_attn_alpha",
    "layernorm_full_attention_beta": "full_attn_beta",
    "layernorm_linear_attention_alpha": "linear_attn_alpha",
    "layernorm_linear_attention_beta": "linear_attn_beta",
    "layernorm_mlp_alpha": "mlp_alpha",
    "layernorm_mlp_beta": "mlp_beta",
}
# transformers' native names for the same six factors.
_NATIVE_RESIDUAL_FIELDS = {
    "full_attn_alpha_factor": "full_attn_alpha",
    "full_attn_beta_factor": "full_attn_beta",
    "linear_attn_alpha_factor": "linear_attn_alpha",
    "linear_attn_beta_factor": "linear_attn_beta",
    "mlp_alpha_factor": "mlp_alpha",
    "mlp_beta_factor": "mlp_beta",
}
# Fields copied verbatim in both formats.
_COMMON_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "num_local_experts",
    "num_experts_per_tok",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "router_aux_loss_coef",
    "router_jitter_noise",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)

M1_DEEPNORM_ALPHA = 3.5565588200778455  # (2 * 80) ** 0.25


class ConfigError(ValueError):
    """A config.json the model cannot run; the message names the field (and file)."""


def m1_layer_types(num_layers: int, period: int = 8) -> tuple[str, ...]:
    """M1's pattern: softmax attention at every ``period``-th layer, lightning elsewhere."""
    return tuple(FULL if (i + 1) % period == 0 else LINEAR for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class M1Config:
    """Architecture of a MiniMax-M1 / Text-01 model (defaults: the released M1)."""

    vocab_size: int = 200064
    hidden_size: int = 6144
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 9216
    num_local_experts: int = 32
    num_experts_per_tok: int = 2
    layer_types: tuple[str, ...] = m1_layer_types(80)
    rotary_dim: int = 64
    rope_theta: float = 10_000_000.0
    max_position_embeddings: int = 10_240_000
    rms_norm_eps: float = 1e-5
    # The lightning output norm uses the RMSNorm class default of the original code.
    lightning_norm_eps: float = 1e-6
    full_attn_alpha: float = M1_DEEPNORM_ALPHA
    full_attn_beta: float = 1.0
    linear_attn_alpha: float = M1_DEEPNORM_ALPHA
    linear_attn_beta: float = 1.0
    mlp_alpha: float = M1_DEEPNORM_ALPHA
    mlp_beta: float = 1.0
    # Lightning chunk length of the original code (hard-coded there, not in config.json).
    block_size: int = 256
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = "minimax_m1"

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "config") -> None:
        def fail(field: str, msg: str):
            raise ConfigError(f"{source}: field '{field}': {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size", "num_local_experts",
                     "num_experts_per_tok", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(name, f"must be a positive integer, got {v!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            fail("layer_types", f"has {len(self.layer_types)} entries but num_hidden_layers is "
                 f"{self.num_hidden_layers}")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                fail("layer_types", f"entry {i} is {t!r}; known layer types are {LAYER_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"num_attention_heads ({self.num_attention_heads}) is not "
                 f"divisible by num_key_value_heads ({self.num_key_value_heads})")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            fail("rotary_dim", f"must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            fail("num_experts_per_tok", f"{self.num_experts_per_tok} exceeds num_local_experts "
                 f"({self.num_local_experts})")
        if self.hidden_act != "silu":
            fail("hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.tie_word_embeddings:
            fail("tie_word_embeddings", "MiniMax-M1 has an untied output head; tied heads are not supported")
        for name in ("rms_norm_eps", "lightning_norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                fail(name, f"must be positive, got {getattr(self, name)!r}")

    # ------------------------------------------------------------------ derived
    @property
    def num_lightning_layers(self) -> int:
        return sum(t == LINEAR for t in self.layer_types)

    @property
    def num_softmax_layers(self) -> int:
        return sum(t == FULL for t in self.layer_types)

    @functools.cached_property
    def period(self) -> int:
        """Length of the repeating layer pattern (8 for M1); the layer stack is scanned over periods."""
        n = self.num_hidden_layers
        for p in range(1, n + 1):
            if n % p == 0 and all(self.layer_types[i] == self.layer_types[i % p] for i in range(n)):
                return p
        return n  # unreachable: p == n always matches

    @property
    def num_periods(self) -> int:
        return self.num_hidden_layers // self.period

    def replace(self, **changes: Any) -> "M1Config":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "M1Config":
        """Reads a config.json dict in the original M1 names or transformers' native names."""

        def fail(field: str, msg: str):
            raise ConfigError(f"{source}: field '{field}': {msg}")

        kw: dict[str, Any] = {}
        for name in _COMMON_FIELDS:
            if name in d:
                kw[name] = d[name]
        if isinstance(kw.get("eos_token_id"), list):  # some configs list several eos ids
            kw["eos_token_id"] = kw["eos_token_id"][0] if kw["eos_token_id"] else None
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if name not in d:
                fail(name, "is missing")
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        if kw.get("head_dim") is None:
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        head_dim = kw["head_dim"]

        if d.get("postnorm", True) is not True:
            fail("postnorm", "must be true (MiniMax-M1 uses the DeepNorm post-norm residual)")
        shared = d.get("shared_intermediate_size", 0)
        if isinstance(shared, (list, tuple)):
            shared = max(shared) if shared else 0
        if shared:
            fail("shared_intermediate_size", f"is {shared}; shared experts are not supported (must be 0)")
        if d.get("sliding_window") not in (None, 0):
            fail("sliding_window", f"is {d['sliding_window']!r}; sliding-window attention is not supported")

        if "attn_type_list" in d:
            codes = d["attn_type_list"]
            if not isinstance(codes, (list, tuple)):
                fail("attn_type_list", f"must be a list with one entry per layer, got {codes!r}")
            if len(codes) != d["num_hidden_layers"]:
                fail("attn_type_list", f"has {len(codes)} entries but num_hidden_layers is {d['num_hidden_layers']}")
            types = []
            for i, c in enumerate(codes):
                if c not in _ATTN_TYPE_CODES:
                    fail("attn_type_list", f"entry {i} is {c!r}; expected 0 (lightning) or 1 (softmax)")
                types.append(_ATTN_TYPE_CODES[c])
            kw["layer_types"] = tuple(types)
        elif d.get("layer_types") is not None:
            kw["layer_types"] = tuple(d["layer_types"])
        else:
            fail("attn_type_list", "is missing (or 'layer_types'); the layer pattern must be explicit")

        for src, dst in {**_ORIG_RESIDUAL_FIELDS, **_NATIVE_RESIDUAL_FIELDS}.items():
            if src in d:
                kw[dst] = float(d[src])
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", "default") not in ("default", None):
            fail("rope_parameters", f"rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
        kw["rope_theta"] = float(d.get("rope_theta", rope.get("rope_theta", 10_000_000.0)))
        if "rotary_dim" in d:
            kw["rotary_dim"] = d["rotary_dim"]
        else:
            factor = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
            kw["rotary_dim"] = int(round(head_dim * factor))
        for name in ("block_size", "block"):
            if d.get(name) is not None:
                kw["block_size"] = int(d[name])
        if "model_type" in d:
            kw["model_type"] = d["model_type"]
        try:
            cfg = cls(**kw)
        except ConfigError as e:
            raise ConfigError(str(e).replace("config:", f"{source}:", 1)) from None
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "M1Config":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object of config fields, got {type(d).__name__}")
        return cls.from_dict(d, source=path)

    def to_dict(self) -> dict[str, Any]:
        """The original MiniMax-M1 config.json format."""
        d: dict[str, Any] = {
            "architectures": ["MiniMaxM1ForCausalLM"],
            "model_type": self.model_type,
        }
        for name in _COMMON_FIELDS:
            d[name] = getattr(self, name)
        inv = {v: k for k, v in _ORIG_RESIDUAL_FIELDS.items()}
        for field in inv:
            d[inv[field]] = getattr(self, field)
        codes = {v: k for k, v in _ATTN_TYPE_CODES.items()}
        d["attn_type_list"] = [codes[t] for t in self.layer_types]
        d["rotary_dim"] = self.rotary_dim
        d["rope_theta"] = self.rope_theta
        d["postnorm"] = True
        d["shared_intermediate_size"] = 0
        d["shared_moe_mode"] = "sigmoid"
        d["attention_dropout"] = 0.0
        d["sliding_window"] = None
        if self.block_size != 256:
            d["block_size"] = self.block_size
        return d

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


def param_counts(cfg: M1Config) -> dict[str, int]:
    """Parameter counts computed from the architecture.

    ``total``: every weight. ``active``: weights one token touches, excluding the embedding table and
    the output head (the convention of the published 45.9B figure): all attention and norm weights,
    the router, and ``num_experts_per_tok`` of the experts.
    """
    D, H, KV, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, I, k = cfg.num_local_experts, cfg.intermediate_size, cfg.num_experts_per_tok
    lightning = D * 3 * H * d + D * H * d + H * d + H * d * D  # qkv, gate, norm, out
    softmax = D * H * d + 2 * D * KV * d + H * d * D  # q, k, v, o
    expert = 3 * D * I
    router = D * E
    norms = 2 * D
    embed = head = cfg.vocab_size * D
    n_lin, n_full = cfg.num_lightning_layers, cfg.num_softmax_layers
    attn = n_lin * lightning + n_full * softmax
    L = cfg.num_hidden_layers
    total = embed + head + D + attn + L * (norms + router + E * expert)
    active = D + attn + L * (norms + router + k * expert)
    return {
        "total": total,
        "active": active,
        "embedding": embed,
        "lm_head": head,
        "attention": attn,
        "experts": L * E * expert,
        "router": L * router,
        "norms": L * norms + D,
        "lightning_layer": lightning,
        "softmax_layer": softmax,
        "expert": expert,
    }


def human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def describe(cfg: M1Config) -> str:
    """A human-readable summary of the architecture and parameter counts (``m1 info``)."""
    c = param_counts(cfg)
    lines = [
        f"model_type            {cfg.model_type}",
        f"layers                {cfg.num_hidden_layers} ({cfg.num_lightning_layers} lightning, "
        f"{cfg.num_softmax_layers} softmax; period {cfg.period}, scanned {cfg.num_periods}x)",
        f"hidden / vocab        {cfg.hidden_size} / {cfg.vocab_size}",
        f"heads                 {cfg.num_attention_heads} x {cfg.head_dim} (kv heads {cfg.num_key_value_heads}), "
        f"rotary_dim {cfg.rotary_dim}, rope_theta {cfg.rope_theta:g}",
        f"experts               {cfg.num_local_experts} x {cfg.intermediate_size}, top-{cfg.num_experts_per_tok}",
        f"lightning block       {cfg.block_size}",
        f"total parameters      {c['total']:,} ({human(c['total'])})",
        f"active per token      {c['active']:,} ({human(c['active'])}, excluding embedding and head)",
        f"  attention           {c['attention']:,}",
        f"  experts (all)       {c['experts']:,}",
        f"  embedding + head    {c['embedding'] + c['lm_head']:,}",
    ]
    lin_state = cfg.num_attention_heads * cfg.head_dim * cfg.head_dim * 4
    kv_tok = 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    lines.append(f"lightning state       {lin_state * cfg.num_lightning_layers / 2**20:.0f} MiB per sequence "
                 f"(fp32, constant in context length)")
    lines.append(f"softmax KV cache      {kv_tok * cfg.num_softmax_layers / 2**10:.0f} KiB per token (bf16)")
    return "\n".join(lines)


