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
import math
import numbers
import os
from typing import Any, Mapping

import ml_dtypes
import numpy as np

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
    """A config.json the model cannot run; the message names the field (and file).

    ``field`` and ``detail`` hold the field's name and what is wrong with it, when one field is at fault."""

    def __init__(self, message: str, *, field: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.field, self.detail = field, detail


def _field_error(source: str, field: str, detail: str) -> ConfigError:
    return ConfigError(f"{source}: field '{field}': {detail}", field=field, detail=detail)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _positive_int_error(v: Any) -> str | None:
    """Why ``v`` is not a positive integer (None if it is)."""
    return None if _is_int(v) and v > 0 else f"must be a positive integer, got {v!r}"


def _real_error(v: Any, *, positive: bool) -> str | None:
    """Why ``v`` is not a finite number > 0 (``positive``) or >= 0 (None if it is)."""
    if _is_real(v) and math.isfinite(v) and (v > 0 if positive else v >= 0):
        return None
    return f"must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}"


# Fields by kind (checked in this order by M1Config.validate, so that relations see well-typed values).
_POSITIVE_INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim", "intermediate_size", "num_local_experts",
                        "num_experts_per_tok", "rotary_dim", "max_position_embeddings", "block_size")
_POSITIVE_REAL_FIELDS = ("rope_theta", "rms_norm_eps", "lightning_norm_eps", "full_attn_alpha", "full_attn_beta",
                         "linear_attn_alpha", "linear_attn_beta", "mlp_alpha", "mlp_beta", "initializer_range")
_NON_NEGATIVE_REAL_FIELDS = ("router_aux_loss_coef", "router_jitter_noise")
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


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
        if isinstance(self.layer_types, (str, bytes)) or not isinstance(self.layer_types, (list, tuple)):
            raise _field_error("config", "layer_types", f"must be a list of layer types, got {self.layer_types!r}")
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()
        for name in _POSITIVE_INT_FIELDS:  # e.g. numpy integers: plain Python numbers from here on
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in _POSITIVE_REAL_FIELDS + _NON_NEGATIVE_REAL_FIELDS:
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in _TOKEN_ID_FIELDS:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "config") -> None:
        """Checks every field's type (bools are not numbers), finiteness and range, then their relations."""
        def fail(field: str, msg: str):
            raise _field_error(source, field, msg)

        for name in _POSITIVE_INT_FIELDS:
            if (err := _positive_int_error(getattr(self, name))) is not None:
                fail(name, err)
        for names, positive in ((_POSITIVE_REAL_FIELDS, True), (_NON_NEGATIVE_REAL_FIELDS, False)):
            for name in names:
                if (err := _real_error(getattr(self, name), positive=positive)) is not None:
                    fail(name, err)
        for name in _TOKEN_ID_FIELDS:
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and 0 <= v < self.vocab_size):
                fail(name, f"must be null or a token id in [0, vocab_size={self.vocab_size}), got {v!r}")
        for name in ("hidden_act", "model_type"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                fail(name, f"must be a non-empty string, got {getattr(self, name)!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            fail("tie_word_embeddings", f"must be true or false, got {self.tie_word_embeddings!r}")

        if len(self.layer_types) != self.num_hidden_layers:
            fail("layer_types", f"has {len(self.layer_types)} entries but num_hidden_layers is "
                 f"{self.num_hidden_layers}")
        for i, t in enumerate(self.layer_types):
            if not isinstance(t, str) or t not in LAYER_TYPES:
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
        """Reads a config.json dict in the original M1 names or transformers' native names.

        Every error names ``source`` and the field as the dict spells it (e.g. ``layernorm_mlp_alpha``,
        ``rope_parameters.rope_theta``)."""

        def fail(field: str, msg: str):
            raise _field_error(source, field, msg)

        kw: dict[str, Any] = {}
        spelled: dict[str, str] = {}  # dataclass field -> the key it was read from, where they differ
        for name in _COMMON_FIELDS:
            if name in d:
                kw[name] = d[name]
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if name not in d:
                fail(name, "is missing")
            if (err := _positive_int_error(d[name])) is not None:  # used below, before the dataclass checks
                fail(name, err)
        if isinstance(kw.get("eos_token_id"), list):  # some configs list several eos ids: the first one counts
            ids = kw["eos_token_id"]
            for i, t in enumerate(ids):
                if not (_is_int(t) and 0 <= t < d["vocab_size"]):
                    fail("eos_token_id", f"entry {i} is {t!r}; token ids are in [0, vocab_size={d['vocab_size']})")
            kw["eos_token_id"] = ids[0] if ids else None
        if kw.get("num_key_value_heads") is None:
            kw["num_key_value_heads"] = d["num_attention_heads"]
        if kw.get("head_dim") is None:
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        elif (err := _positive_int_error(kw["head_dim"])) is not None:
            fail("head_dim", err)
        head_dim = kw["head_dim"]

        if d.get("postnorm", True) is not True:
            fail("postnorm", "must be true (MiniMax-M1 uses the DeepNorm post-norm residual)")
        shared = d.get("shared_intermediate_size", 0)
        sizes = shared if isinstance(shared, (list, tuple)) else [shared]
        if any(v is not None and (not _is_int(v) or v != 0) for v in sizes):
            fail("shared_intermediate_size", f"is {shared!r}; shared experts are not supported (must be 0)")
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
                if not _is_int(c) or c not in _ATTN_TYPE_CODES:
                    fail("attn_type_list", f"entry {i} is {c!r}; expected 0 (lightning) or 1 (softmax)")
                types.append(_ATTN_TYPE_CODES[c])
            kw["layer_types"] = tuple(types)
        elif d.get("layer_types") is not None:
            kw["layer_types"] = d["layer_types"]  # checked by the dataclass
        else:
            fail("attn_type_list", "is missing (or 'layer_types'); the layer pattern must be explicit")

        for src, dst in {**_ORIG_RESIDUAL_FIELDS, **_NATIVE_RESIDUAL_FIELDS}.items():
            if src in d:
                kw[dst], spelled[dst] = d[src], src
        rope, rope_key = {}, "rope_parameters"
        for key in ("rope_parameters", "rope_scaling"):
            value = d.get(key)
            if value is None:
                continue
            if not isinstance(value, Mapping):
                fail(key, f"must be an object (or null), got {value!r}")
            if value:
                rope, rope_key = value, key
                break
        if rope.get("rope_type", "default") not in ("default", None):
            fail(rope_key, f"rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
        if d.get("rope_theta") is not None:
            kw["rope_theta"] = d["rope_theta"]
        elif rope.get("rope_theta") is not None:
            kw["rope_theta"], spelled["rope_theta"] = rope["rope_theta"], f"{rope_key}.rope_theta"
        derived = ""
        if "rotary_dim" in d:
            kw["rotary_dim"] = d["rotary_dim"]
        else:
            key = f"{rope_key}.partial_rotary_factor" if "partial_rotary_factor" in rope else "partial_rotary_factor"
            factor = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
            if (err := _real_error(factor, positive=True)) is not None:
                fail(key, err)
            kw["rotary_dim"] = int(round(head_dim * factor))
            derived = f" (head_dim {head_dim} x {key} {factor})"
        for name in ("block_size", "block"):
            if d.get(name) is not None:
                kw["block_size"], spelled["block_size"] = d[name], name
        if "model_type" in d:
            kw["model_type"] = d["model_type"]
        try:
            cfg = cls(**kw)
        except ConfigError as e:
            detail = e.detail + (derived if e.field == "rotary_dim" else "")
            raise _field_error(source, spelled.get(e.field, e.field), detail) from None
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


def lightning_state_bytes(cfg: M1Config, batch: int = 1) -> int:
    """Bytes of all lightning states (float32 ``[heads, head_dim, head_dim]`` per layer and row): independent
    of the context length."""
    return 4 * batch * cfg.num_lightning_layers * cfg.num_attention_heads * cfg.head_dim ** 2


def kv_cache_bytes(cfg: M1Config, batch: int, max_len: int, dtype: Any = np.float32) -> int:
    """Bytes of the softmax layers' keys and values for ``batch`` rows of ``max_len`` tokens in ``dtype``
    (a NumPy, ml_dtypes or JAX dtype, or its name such as ``"bfloat16"``)."""
    itemsize = np.dtype(getattr(ml_dtypes, dtype, dtype) if isinstance(dtype, str) else dtype).itemsize
    return 2 * itemsize * batch * max_len * cfg.num_softmax_layers * cfg.num_key_value_heads * cfg.head_dim


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
    lines.append(f"lightning state       {lightning_state_bytes(cfg) / 2**20:.0f} MiB per sequence "
                 f"(fp32, constant in context length)")
    lines.append(f"softmax KV cache      {kv_cache_bytes(cfg, 1, 1, 'bfloat16') / 2**10:.0f} KiB per token (bf16)")
    return "\n".join(lines)


