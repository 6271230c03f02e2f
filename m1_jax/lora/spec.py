"""Which weights get LoRA adapters and how (no JAX: run configs, ``m1 export`` and the CLI read it).

A LoRA adapter on a weight ``W`` (Flax layout: its contracted input axes, then its output axes) is a pair
``A`` [in..., rank] and ``B`` [rank, out...]: the layer computes ``x @ W + (x @ A) @ B * alpha / rank`` and
the merged weight is ``W + A B * alpha / rank`` (:func:`merged`). ``A`` starts uniform in
``+-1 / sqrt(fan_in)`` (PEFT's default), ``B`` at zero, so a fresh adapter leaves the model as it was.

Targets (:data:`TARGETS`): the attention projections (lightning ``qkv_proj``, ``output_gate``, ``out_proj``;
softmax ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) and the routed experts' ``w1``, ``w3``, ``w2``, whose
adapters are per expert (``A`` [experts, in, rank], ``B`` [experts, rank, out]) and stacked and sharded like
the experts. ``attention``, ``experts`` and ``all`` name groups. In the model's state an adapter of weight
``NAME`` is the sibling parameters ``NAME_lora_a`` and ``NAME_lora_b``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from m1_jax.quant.spec import ATTENTION_WEIGHTS, EXPERT_WEIGHTS

LORA_A, LORA_B = "_lora_a", "_lora_b"
# target name -> the layer parameter (relative to a decoder layer) and how many leading axes its matmul contracts
TARGETS = {name.split(".")[1]: (name, c) for name, c in {**ATTENTION_WEIGHTS, **EXPERT_WEIGHTS}.items()}
GROUPS = {
    "attention": tuple(n.split(".")[1] for n in ATTENTION_WEIGHTS),
    "experts": tuple(n.split(".")[1] for n in EXPERT_WEIGHTS),
}
GROUPS["all"] = GROUPS["attention"] + GROUPS["experts"]
EXPERT_TARGETS = frozenset(GROUPS["experts"])
BASE_CHOICES = ("float", "int8")  # the frozen base weights: as they are, or the experts in int8 (QLoRA)


class LoraError(ValueError):
    """A LoRA option the model does not have (the message names the argument, flag or field)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapters of ``rank`` on ``targets`` (names of :data:`TARGETS`), scaled by ``alpha / rank``."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise LoraError(f"lora rank must be an integer >= 1, got {self.rank!r}")
        if not np.isfinite(self.alpha) or self.alpha <= 0:
            raise LoraError(f"lora alpha must be a number > 0, got {self.alpha!r}")
        object.__setattr__(self, "targets", expand_targets(self.targets))

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def params(self) -> tuple[str, ...]:
        """The targeted layer parameters (``self_attn.q_proj``, ``block_sparse_moe.w1``, ...)."""
        return tuple(TARGETS[t][0] for t in self.targets)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": float(self.alpha), "targets": ",".join(self.targets)}


def expand_targets(targets, what: str = "lora targets") -> tuple[str, ...]:
    """Names and groups (a comma-separated string or a sequence) -> the target names, in :data:`TARGETS`
    order, each once."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t) for t in targets]
    picked = set()
    for name in names:
        if name in GROUPS:
            picked.update(GROUPS[name])
        elif name in TARGETS:
            picked.add(name)
        else:
            raise LoraError(f"{what}: unknown target {name!r} (targets: {', '.join(TARGETS)}; groups: "
                            f"{', '.join(GROUPS)})")
    if not picked:
        raise LoraError(f"{what}: name at least one target ({', '.join(GROUPS)} or {', '.join(TARGETS)})")
    return tuple(t for t in TARGETS if t in picked)


def parse_flag(text: str) -> dict:
    """``--lora rank=8,alpha=16,targets=q_proj,v_proj,experts[,base=int8]`` -> ``{"rank": 8, "alpha": 16.0,
    "targets": "q_proj,v_proj,experts", "base": "int8"}`` (items without ``=`` after ``targets=`` are more
    targets). Errors name the flag."""
    out: dict = {}
    last = None
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            if last != "targets" or not key:
                raise LoraError(f"--lora {text!r}: expected rank=R,alpha=A,targets=T[,T...][,base=int8], got {item!r}")
            out["targets"] += "," + key
            continue
        if key not in ("rank", "alpha", "targets", "base") or key in out:
            raise LoraError(f"--lora {text!r}: {'repeated' if key in out else 'unknown'} key {key!r} "
                            "(keys: rank, alpha, targets, base)")
        value = value.strip()
        try:
            out[key] = int(value) if key == "rank" else float(value) if key == "alpha" else value
        except ValueError:
            raise LoraError(f"--lora {text!r}: {key} must be a number, got {value!r}") from None
        last = key
    if "rank" not in out:
        raise LoraError(f"--lora {text!r}: rank=R is required")
    LoraConfig(out["rank"], out.get("alpha", float(out["rank"])), out.get("targets", "attention"))  # checks
    if out.get("base", "float") not in BASE_CHOICES:
        raise LoraError(f"--lora {text!r}: base must be one of {', '.join(BASE_CHOICES)}, got {out['base']!r}")
    return out


def from_run(run: dict | None) -> tuple[LoraConfig | None, str | None]:
    """(adapters, ``"int8"`` for a QLoRA base or None) of a run config as saved in a checkpoint's meta (the
    ``lora`` section; a run without it, or with ``rank`` 0, has no adapters)."""
    section = (run or {}).get("lora") or {}
    if not section.get("rank"):
        return None, None
    cfg = LoraConfig(int(section["rank"]), float(section["alpha"]), section["targets"])
    return cfg, ("int8" if section.get("base") == "int8" else None)


def adapter_shapes(shape: tuple[int, ...], stacked: int, contracted: int, rank: int):
    """Shapes of ``A`` and ``B`` of a weight of ``shape`` whose ``contracted`` axes follow ``stacked`` ones."""
    lead, cut = tuple(shape[:stacked]), stacked + contracted
    return lead + tuple(shape[stacked:cut]) + (rank,), lead + (rank,) + tuple(shape[cut:])


def delta(a: np.ndarray, b: np.ndarray, scale: float, xp=np):
    """``A B * scale`` in float32 (``a`` [..., in..., r], ``b`` [..., r, out...] with the same leading axes
    ``a.ndim - b.ndim`` apart as given: one slot, no stacked axes)."""
    return xp.tensordot(a.astype(xp.float32), b.astype(xp.float32), axes=1) * xp.float32(scale)


def merged(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, xp=np):
    """One slot's weight with its adapter merged: ``W + A B * scale`` (float32 sum), in ``w``'s dtype."""
    return (w.astype(xp.float32) + delta(a, b, scale, xp)).astype(w.dtype)
