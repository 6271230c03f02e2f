"""The one table that maps Hugging Face checkpoint keys onto model parameters (and back).

Each row names a checkpoint key template (``{layer}``, ``{expert}`` placeholders; original MiniMax-M1
names first, transformers-5 aliases after), the parameter it fills (relative to a decoder layer for
per-layer keys), the layout change, and which layer type owns it. Model parameters are stacked:
a per-layer parameter has a leading ``[num_periods]`` axis (layer ``l`` lives in period ``l // P`` at
position ``l % P``) and expert weights a second ``[num_experts]`` axis. The converter and the loader
both go through :func:`plan`, so there is exactly one mapping.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from m1_jax.config import FULL, LINEAR, M1Config


# Layout changes from PyTorch [out, in] to Flax [in, out]; the result is reshaped to the slot shape.
def _vector(x):  # norms: [n] -> slot shape (e.g. [heads, head_dim])
    return x


def _linear(x):  # [out, in] -> [in, out]
    return x.T


def _experts(x):  # [E, out, in] -> [E, in, out]
    return x.transpose(0, 2, 1)


def _gate_half(x):  # transformers-5 gate_up_proj [E, 2I, D]: the first half is w1 (gate)
    return x[:, : x.shape[1] // 2].transpose(0, 2, 1)


def _up_half(x):  # ... the second half is w3 (up)
    return x[:, x.shape[1] // 2:].transpose(0, 2, 1)


# Inverse layouts (model -> checkpoint) for export; keyed by the forward function.
def _inverse(fn, x, hf_shape):
    if fn is _vector:
        return x.reshape(hf_shape)
    if fn is _linear:
        return x.reshape(-1, hf_shape[0]).T
    if fn is _experts:
        return x.transpose(0, 2, 1)
    raise ValueError(f"no inverse for {fn.__name__}")


@dataclass(frozen=True)
class KeyRule:
    hf: str  # checkpoint key template
    param: str  # dotted parameter path (per-layer rows: relative to the decoder layer)
    layout: object  # one of the layout functions above
    shape: str  # checkpoint tensor shape, in config terms: D hidden, V vocab, H heads, K kv heads,
    #             d head_dim, E experts, I expert width
    layer_type: str | None = None  # LINEAR / FULL for attention weights; None: any layer / not per-layer
    canonical: bool = True  # the original M1 name (export writes these); aliases are False
    param_shape: str = ""  # canonical rows: the parameter's shape per slot (same terms as ``shape``)
    fp32: bool = False  # the parameter stays float32 whatever the model's parameter dtype

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.hf

    @functools.cached_property
    def regex(self) -> re.Pattern:
        pat = re.escape(self.hf).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
        return re.compile(pat + r"\Z")


_L = "model.layers.{layer}."
_MOE = _L + "block_sparse_moe."
KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule("model.embed_tokens.weight", "embed_tokens", _vector, "V,D", param_shape="V,D"),
    KeyRule("model.norm.weight", "norm.weight", _vector, "D", param_shape="D"),
    KeyRule("lm_head.weight", "lm_head", _linear, "V,D", param_shape="D,V"),
    KeyRule(_L + "input_layernorm.weight", "input_layernorm.weight", _vector, "D", param_shape="D"),
    KeyRule(_L + "post_attention_layernorm.weight", "post_attention_layernorm.weight", _vector, "D",
            param_shape="D"),
    # lightning attention
    KeyRule(_L + "self_attn.qkv_proj.weight", "self_attn.qkv_proj", _linear, "3*H*d,D", LINEAR, param_shape="D,H,3*d"),
    #         ^ head-interleaved: each head's q, k, v rows together,
    KeyRule(_L + "self_attn.output_gate.weight", "self_attn.output_gate", _linear, "H*d,D", LINEAR, param_shape="D,H,d"),
    KeyRule(_L + "self_attn.norm.weight", "self_attn.norm.weight", _vector, "H*d", LINEAR, param_shape="H,d"),
    KeyRule(_L + "self_attn.out_proj.weight", "self_attn.out_proj", _linear, "D,H*d", LINEAR, param_shape="H,d,D"),
    # softmax attention
    KeyRule(_L + "self_attn.q_proj.weight", "self_attn.q_proj", _linear, "H*d,D", FULL, param_shape="D,H,d"),
    KeyRule(_L + "self_attn.k_proj.weight", "self_attn.k_proj", _linear, "K*d,D", FULL, param_shape="D,K,d"),
    KeyRule(_L + "self_attn.v_proj.weight", "self_attn.v_proj", _linear, "K*d,D", FULL, param_shape="D,K,d"),
    KeyRule(_L + "self_attn.o_proj.weight", "self_attn.o_proj", _linear, "D,H*d", FULL, param_shape="H,d,D"),
    # mixture of experts (original names)
    KeyRule(_MOE + "gate.weight", "block_sparse_moe.gate", _linear, "E,D", param_shape="D,E", fp32=True),
    KeyRule(_MOE + "experts.{expert}.w1.weight", "block_sparse_moe.w1", _linear, "I,D", param_shape="D,I"),
    KeyRule(_MOE + "experts.{expert}.w3.weight", "block_sparse_moe.w3", _linear, "I,D", param_shape="D,I"),
    KeyRule(_MOE + "experts.{expert}.w2.weight", "block_sparse_moe.w2", _linear, "D,I", param_shape="I,D"),
    # transformers-5 names (``.mlp.``, experts fused and stacked)
    KeyRule(_L + "mlp.gate.weight", "block_sparse_moe.gate", _linear, "E,D", canonical=False),
    KeyRule(_L + "mlp.experts.gate_up_proj", "block_sparse_moe.w1", _gate_half, "E,2*I,D", canonical=False),
    KeyRule(_L + "mlp.experts.gate_up_proj", "block_sparse_moe.w3", _up_half, "E,2*I,D", canonical=False),
    KeyRule(_L + "mlp.experts.down_proj", "block_sparse_moe.w2", _experts, "E,D,I", canonical=False),
    KeyRule(_L + "mlp.experts.{expert}.w1.weight", "block_sparse_moe.w1", _linear, "I,D", canonical=False),
    KeyRule(_L + "mlp.experts.{expert}.w3.weight", "block_sparse_moe.w3", _linear, "I,D", canonical=False),
    KeyRule(_L + "mlp.experts.{expert}.w2.weight", "block_sparse_moe.w2", _linear, "D,I", canonical=False),
)

# Buffers derived from the config that some writers save (transformers' decay tables, rotary caches).
IGNORED = re.compile(r".*\.(slope_rate|query_decay|key_decay|diagonal_decay|inv_freq|cos_cached|sin_cached)\Z")


@dataclass(frozen=True)
class Placement:
    """Where (part of) a checkpoint tensor goes: parameter path, index of the slot, layout."""

    key: str  # the checkpoint key
    path: tuple  # flat NNX state path, e.g. ("periods", "layers", 3, "self_attn", "qkv_proj")
    slot: tuple[int, ...]  # leading indices into the stacked parameter (period[, expert])
    layout: object
    hf_shape: tuple[int, ...]  # what the checkpoint tensor must look like

    def apply(self, x: np.ndarray, slot_shape: tuple[int, ...]) -> np.ndarray:
        """Checkpoint tensor -> the slot's value in Flax layout; a shape the config does not give fails."""
        if tuple(x.shape) != self.hf_shape:
            raise ShapeMismatchError(f"'{self.key}' has shape {list(x.shape)}, but the config gives "
                                     f"{list(self.hf_shape)}")
        return self.layout(x).reshape(slot_shape)


class UnknownKeyError(ValueError):
    """A checkpoint key the model has no slot for."""


class ShapeMismatchError(ValueError):
    """A checkpoint tensor whose shape does not match the config."""


def hf_shape(cfg: M1Config, spec: str) -> tuple[int, ...]:
    names = dict(D=cfg.hidden_size, V=cfg.vocab_size, H=cfg.num_attention_heads, K=cfg.num_key_value_heads,
                 d=cfg.head_dim, E=cfg.num_local_experts, I=cfg.intermediate_size)
    out = []
    for dim in spec.split(","):
        n = 1
        for factor in dim.split("*"):
            n *= int(factor) if factor.isdigit() else names[factor]
        out.append(n)
    return tuple(out)


def param_path(cfg: M1Config, rule: KeyRule, layer: int | None) -> tuple:
    parts = tuple(int(p) if p.isdigit() else p for p in rule.param.split("."))
    if layer is None:
        return parts
    return ("periods", "layers", layer % cfg.period) + parts


def plan(cfg: M1Config, key: str) -> list[Placement] | None:
    """Placements of checkpoint tensor ``key``; ``None`` for an ignored derived buffer.

    Raises :class:`UnknownKeyError` (message names the key) for anything else the model has no slot for.
    """
    if IGNORED.match(key):
        return None
    out = []
    for rule in KEY_TABLE:
        m = rule.regex.match(key)
        if not m:
            continue
        layer = int(m["layer"]) if rule.per_layer else None
        if layer is not None:
            if layer >= cfg.num_hidden_layers:
                raise UnknownKeyError(f"'{key}': layer {layer} but the config has {cfg.num_hidden_layers} layers")
            if rule.layer_type and cfg.layer_types[layer] != rule.layer_type:
                raise UnknownKeyError(f"'{key}': a {rule.layer_type} weight, but layer {layer} is "
                                      f"{cfg.layer_types[layer]} in the config")
        slot: tuple[int, ...] = () if layer is None else (layer // cfg.period,)
        if rule.per_expert:
            e = int(m["expert"])
            if e >= cfg.num_local_experts:
                raise UnknownKeyError(f"'{key}': expert {e} but the config has {cfg.num_local_experts} experts")
            slot += (e,)
        out.append(Placement(key, param_path(cfg, rule, layer), slot, rule.layout, hf_shape(cfg, rule.shape)))
    if not out:
        raise UnknownKeyError(f"'{key}': not a MiniMax-M1 parameter name")
    return out


def canonical_keys(cfg: M1Config):
    """Yields ``(checkpoint key, placement)`` for every tensor of the original M1 layout (export)."""
    for _, key, placement in _canonical_rows(cfg):
        yield key, placement


def _canonical_rows(cfg: M1Config):
    """``(rule, checkpoint key, placement)`` for every tensor of the original M1 layout."""
    for rule in KEY_TABLE:
        if not rule.canonical:
            continue
        layers = range(cfg.num_hidden_layers) if rule.per_layer else [None]
        for layer in layers:
            if layer is not None and rule.layer_type and cfg.layer_types[layer] != rule.layer_type:
                continue
            experts = range(cfg.num_local_experts) if rule.per_expert else [None]
            for e in experts:
                key = rule.hf.format(layer=layer, expert=e)
                slot = (() if layer is None else (layer // cfg.period,)) + (() if e is None else (e,))
                yield rule, key, Placement(key, param_path(cfg, rule, layer), slot, rule.layout,
                                           hf_shape(cfg, rule.shape))


def param_layout(cfg: M1Config) -> dict[tuple, tuple[tuple[int, ...], bool]]:
    """Every model parameter, from the canonical rows: flat NNX path -> (stacked shape, stays float32).

    A per-layer parameter has a leading ``[num_periods]`` axis and an expert weight then ``[num_experts]``
    (tests check this equals the state of :func:`m1_jax.model.abstract_model` for every shipped config).
    """
    out: dict[tuple, tuple[tuple[int, ...], bool]] = {}
    for rule, _, pl in _canonical_rows(cfg):
        lead = ((cfg.num_periods,) if pl.slot else ()) + ((cfg.num_local_experts,) if rule.per_expert else ())
        out[pl.path] = (lead + hf_shape(cfg, rule.param_shape), rule.fp32)
    return out


def to_checkpoint_layout(placement: Placement, value: np.ndarray) -> np.ndarray:
    """Inverse of :meth:`Placement.apply` for canonical rows (model slot -> checkpoint tensor)."""
    return _inverse(placement.layout, value, placement.hf_shape)
