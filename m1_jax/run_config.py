"""Run configs for ``m1 train``: model config name + mesh + optimizer + data + schedule, as JSON.

A run config (a ``train-*.json`` preset or any file) is a nested JSON object whose sections and fields are the
dataclasses below; anything missing takes the default, anything unknown is an error naming the file
and key. Every field can be overridden on the command line with ``--set section.field=value`` (the
value is read as JSON when it parses, else as a string).

Each value is checked when it is set (type, finiteness, range, choices: :data:`RULES`), the relations
between fields once the whole config is read (:meth:`RunConfig.validate`); every error is one line
naming the file or ``--set`` flag and ``section.field``. :func:`resume_conflicts` lists what a resumed
run changed among the fields it must keep (:data:`RESUME_FIXED_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from m1_jax.lora.spec import LoraError, expand_targets
from m1_jax.presets import CONFIG_DIR


class RunConfigError(ValueError):
    """A run config or override that cannot be used; the message names the file or flag and the key."""


@dataclasses.dataclass
class ModelSection:
    config: str = "tiny"  # preset name (m1_jax/presets/), or a config.json / checkpoint directory
    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators); master weights are param_dtype
    param_dtype: str = "float32"
    remat: str = "none"  # rematerialisation per layer period: none | full | dots | dots_no_batch
    moe_impl: str = "auto"
    lightning_impl: str = "auto"
    scan_layers: bool = True
    head_dtype: str = "auto"  # the output head's matmul dtype: auto (= dtype) | float32 | bfloat16
    seed: int = 0


@dataclasses.dataclass
class OptimizerSection:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    decay_steps: int | None = None  # default: the run's steps
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2); 0 = off


@dataclasses.dataclass
class DataSection:
    source: str = "stdlib"  # "stdlib" (the Python standard library's *.py files) or a path (file/dir/glob)
    format: str = "auto"  # auto | text | jsonl | tokens (pre-tokenised .npy of token ids, or .npz of arrays)
    tokenizer: str = "byte"  # "byte", or a checkpoint directory holding tokenizer.json
    seq_len: int = 128
    batch_size: int = 16  # global, per step (all hosts, all micro-batches)
    micro_batches: int = 1  # gradient accumulation: batch_size is split into this many micro-batches
    shards: int = 0  # data shards (0 = one per process); the data seen is a function of this, not of the hosts
    shuffle: bool = True
    seed: int = 0
    max_files: int = 0  # read at most this many files (0 = all)
    window: int = 0  # text files: cut into windows of this many bytes, shuffled as documents (0 = whole files)


@dataclasses.dataclass
class TrainSection:
    steps: int = 300
    mesh: str = "data=2,fsdp=2,expert=2,tensor=1"
    checkpoint_every: int = 100
    max_to_keep: int = 2
    async_checkpointing: bool = True
    on_nan: str = "stop"  # stop | skip: a non-finite loss or gradient stops the run, or skips the update
    sample_tokens: int = 200  # tokens sampled from the final checkpoint (0 = none)
    sample_prompt: str = "def "
    peak_flops_per_device: float = 0.0  # for MFU; 0 = from the device kind when known
    fast_compile: bool = False  # skip XLA's backend optimisations: compiles several times faster, runs slower


@dataclasses.dataclass
class LoraSection:
    rank: int = 0  # LoRA adapters of this rank on the targets, the base weights frozen (0: full fine-tuning)
    alpha: float = 16.0  # the adapters are scaled by alpha / rank
    targets: str = "attention"  # comma-separated: attention | experts | all, or weight names (docs/lora.md)
    base: str = "float"  # float | int8: the frozen base with its experts in int8 (QLoRA)
    seed: int = 0  # draws the adapters' A matrices


SECTIONS = {"model": ModelSection, "optimizer": OptimizerSection, "data": DataSection, "train": TrainSection,
            "lora": LoraSection}

# String fields with a fixed set of values. The model's choices are those of m1_jax.model.REMAT_POLICIES,
# m1_jax.layers.moe.MOE_IMPLS and pallas_kernels.lightning.IMPLS (a test keeps them equal; importing
# them here would load JAX just to read a run config).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.moe_impl": ("auto", "ragged", "chunked", "dense"),
    "model.lightning_impl": ("auto", "reference", "xla", "pallas"),
    "model.head_dtype": ("auto", "float32", "bfloat16"),
    "data.format": ("auto", "text", "jsonl", "tokens"),
    "train.on_nan": ("stop", "skip"),
    "lora.base": ("float", "int8"),
}
MAX_SEED = 2 ** 32


def _at_least(lo) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be >= {lo}, got {v!r}"


def _positive(v) -> str | None:
    return None if v > 0 else f"must be > 0, got {v!r}"


def _unit_interval(closed: bool) -> Callable[[Any], str | None]:
    def check(v) -> str | None:
        return None if 0 <= v <= 1 and (closed or v < 1) else f"must be in [0, 1{']' if closed else ')'}, got {v!r}"
    return check


def _seed(v) -> str | None:
    return None if 0 <= v < MAX_SEED else f"must be in [0, 2**32), got {v!r}"


def _non_empty(v) -> str | None:
    return None if v else "must not be empty"


def _lora_targets(v) -> str | None:
    try:
        expand_targets(v, what="targets")
    except LoraError as e:
        return str(e).removeprefix("targets: ")
    return None


def _mesh(v) -> str | None:
    # Lazy: the mesh parser lives with the meshes (JAX); run configs are read without it otherwise.
    from m1_jax.sharding import MeshError, parse_mesh_spec

    try:
        parse_mesh_spec(v)
    except MeshError as e:
        prefix = f"--mesh {v!r}: "
        return str(e)[len(prefix):] if str(e).startswith(prefix) else str(e)
    return None


# The range of each field (its type is the default's: see _coerce); fields not listed take any value
# of their type.
RULES: dict[str, Callable[[Any], str | None]] = {
    "model.config": _non_empty,
    "model.seed": _seed,
    "optimizer.lr": _positive,
    "optimizer.min_lr_ratio": _unit_interval(closed=True),
    "optimizer.warmup_steps": _at_least(0),
    "optimizer.decay_steps": _at_least(1),
    "optimizer.b1": _unit_interval(closed=False),
    "optimizer.b2": _unit_interval(closed=False),
    "optimizer.eps": _positive,
    "optimizer.weight_decay": _at_least(0),
    "optimizer.clip_norm": _at_least(0),  # 0: no clipping
    "optimizer.z_loss": _at_least(0),
    "data.source": _non_empty,
    "data.tokenizer": _non_empty,
    "data.seq_len": _at_least(2),  # a row holds at least one input and its next token
    "data.batch_size": _at_least(1),
    "data.micro_batches": _at_least(1),
    "data.shards": _at_least(0),
    "data.seed": _seed,
    "data.max_files": _at_least(0),
    "data.window": _at_least(0),
    "train.steps": _at_least(1),
    "train.mesh": _mesh,
    "train.checkpoint_every": _at_least(1),
    "train.max_to_keep": _at_least(1),
    "train.sample_tokens": _at_least(0),
    "train.peak_flops_per_device": _at_least(0),
    "lora.rank": _at_least(0),
    "lora.alpha": _positive,
    "lora.targets": _lora_targets,
    "lora.seed": _seed,
}

# What a resumed run must keep: the fields that decide the data stream, which the data iterator state in
# the checkpoint continues. (The model is compared as the resolved config, not by name; data.shards is
# checked against the iterator state itself; batch size, optimizer, schedule length and mesh may change.)
RESUME_FIXED_FIELDS = ("data.source", "data.format", "data.tokenizer", "data.seq_len", "data.shuffle",
                       "data.seed", "data.max_files", "data.window")


class SectionedConfig:
    """A config made of dataclass sections (``SECTIONS``: name -> dataclass) read from JSON and ``--set``
    overrides, each value checked against ``CHOICES`` and ``RULES`` (keyed ``section.field``). Subclasses are
    dataclasses with one field per section; :class:`RunConfig` (``m1 train``) and
    :class:`m1_jax.rl.config.RLRunConfig` (``m1 rl``)."""

    SECTIONS: dict[str, type] = {}
    CHOICES: dict[str, tuple[str, ...]] = {}
    RULES: dict[str, Callable[[Any], str | None]] = {}

    def __post_init__(self):
        self._sources: dict[str, str] = {}  # section.field -> the file or flag that set it last

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "run config"):
        out = cls()
        out.update(d, source)
        out.validate()
        return out

    def update(self, d: dict[str, Any], source: str = "run config") -> None:
        """Sets the fields of a nested dict (sections of fields), each checked as by :meth:`set`."""
        sections = self.SECTIONS
        if not isinstance(d, dict):
            raise RunConfigError(f"{source}: expected a JSON object with sections {', '.join(sections)}")
        for name, values in d.items():
            if name not in sections:
                raise RunConfigError(f"{source}: unknown section {name!r} (sections: {', '.join(sections)})")
            if not isinstance(values, dict):
                raise RunConfigError(f"{source}: section {name!r} must be a JSON object")
            for key, value in values.items():
                self.set(f"{name}.{key}", value, source=source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def set(self, dotted: str, value: Any, source: str = "--set") -> None:
        """Sets ``section.field`` to ``value``: type-checked against the default's type, then its range."""
        section, _, field = dotted.partition(".")
        if section not in self.SECTIONS or not field:
            raise RunConfigError(f"{source}: {dotted!r} is not SECTION.FIELD with SECTION one of "
                                 f"{', '.join(self.SECTIONS)}")
        obj = getattr(self, section)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if field not in fields:
            raise RunConfigError(f"{source}: unknown key {dotted!r} (fields of {section}: {', '.join(fields)})")
        value = self._checked(dotted, value, fields[field], f"{source}: {dotted}")
        setattr(obj, field, value)
        self._sources.pop(dotted, None)
        self._sources[dotted] = source  # insertion order: the last one set comes last

    def validate(self) -> None:
        """Checks every field (for configs built in code), then the relations between fields
        (:meth:`check_relations`)."""
        for section in self.SECTIONS:
            obj = getattr(self, section)
            for f in dataclasses.fields(obj):
                dotted = f"{section}.{f.name}"
                self._checked(dotted, getattr(obj, f.name), f, f"{self._source(dotted)}: {dotted}")
        self.check_relations()

    def check_relations(self) -> None:
        """Raises (through :meth:`_fail`) when fields that are valid alone do not go together."""

    def _checked(self, dotted: str, value: Any, f: dataclasses.Field, what: str):
        return _checked(dotted, value, f, what, self.CHOICES, self.RULES)

    def _source(self, dotted: str) -> str:
        return self._sources.get(dotted, "run config")

    def _fail(self, fields: tuple[str, ...], msg: str):
        """An error about the relation of ``fields``, named after the first, blaming the file or flag
        that set one of them last."""
        order = list(self._sources)
        last = max(fields, key=lambda f: order.index(f) if f in order else -1)
        raise RunConfigError(f"{self._source(last)}: {fields[0]}: {msg}")


@dataclasses.dataclass
class RunConfig(SectionedConfig):
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)

    SECTIONS = SECTIONS
    CHOICES = CHOICES
    RULES = RULES

    def check_relations(self) -> None:
        d, t = self.data, self.train
        if d.batch_size % d.micro_batches:
            self._fail(("data.micro_batches", "data.batch_size"),
                       f"{d.micro_batches} does not divide data.batch_size={d.batch_size}")
        if self.lora.base == "int8" and not self.lora.rank:
            self._fail(("lora.base", "lora.rank"), "int8 (QLoRA) needs LoRA adapters: set lora.rank >= 1")
        if t.sample_tokens and not t.sample_prompt:
            self._fail(("train.sample_prompt", "train.sample_tokens"),
                       f"is empty but train.sample_tokens={t.sample_tokens} (a sample needs a prompt; "
                       f"train.sample_tokens=0 turns the sample off)")


def _checked(dotted: str, value: Any, f: dataclasses.Field, what: str, choices: Mapping = CHOICES,
             rules: Mapping = RULES):
    """``value`` converted to the field's type (:func:`_coerce`) and within its range (``rules``)."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    value = _coerce(value, default, f.type, what)
    if value is None:
        return None
    if dotted in choices and value not in choices[dotted]:
        raise RunConfigError(f"{what}: must be one of {', '.join(choices[dotted])}, got {value!r}")
    rule = rules.get(dotted)
    if rule is not None and (err := rule(value)) is not None:
        raise RunConfigError(f"{what}: {err}")
    return value


def _coerce(value, default, annotation, what: str):
    if value is None and "None" in str(annotation):
        return None
    kind = type(default) if default is not None else int
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise RunConfigError(f"{what}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
            raise RunConfigError(f"{what}: expected an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunConfigError(f"{what}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise RunConfigError(f"{what}: must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise RunConfigError(f"{what}: expected a string, got {value!r}")
    return value


def diff_run_configs(a: RunConfig | Mapping, b: RunConfig | Mapping) -> dict[str, tuple[Any, Any]]:
    """``{"section.field": (value in a, value in b)}`` for every field that differs (dicts as
    :meth:`RunConfig.to_dict` writes them are accepted too)."""
    da = a.to_dict() if isinstance(a, SectionedConfig) else a
    db = b.to_dict() if isinstance(b, SectionedConfig) else b
    out = {}
    for section in dict.fromkeys([*da, *db]):
        sa, sb = da.get(section, {}), db.get(section, {})
        for key in dict.fromkeys([*sa, *sb]):
            if sa.get(key) != sb.get(key):
                out[f"{section}.{key}"] = (sa.get(key), sb.get(key))
    return out


def resume_conflicts(saved: SectionedConfig | Mapping, current: SectionedConfig | Mapping,
                     fixed: tuple[str, ...] = RESUME_FIXED_FIELDS) -> list[str]:
    """What ``current`` changed among ``fixed`` (default :data:`RESUME_FIXED_FIELDS`) against the run config a
    checkpoint was written with, one line per field (empty: the run may resume)."""
    diff = diff_run_configs(saved, current)
    return [f"{f}: {diff[f][0]!r} when the checkpoint was written, {diff[f][1]!r} now"
            for f in fixed if f in diff]


def parse_override(text: str) -> tuple[str, Any]:
    """``"optimizer.lr=1e-3"`` -> ``("optimizer.lr", 0.001)``; the value is JSON when it parses."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise RunConfigError(f"--set {text!r}: expected SECTION.FIELD=VALUE (e.g. optimizer.lr=1e-3)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def resolve_run_config_path(name_or_path: str | os.PathLike, prefix: str = "train-") -> Path:
    """A run config file, or the preset ``NAME`` / ``PREFIXNAME`` in :data:`m1_jax.presets.CONFIG_DIR`."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / f"{name_or_path}.json", CONFIG_DIR / f"{prefix}{name_or_path}.json"):
        if candidate.is_file():
            return candidate
    names = sorted(q.stem for q in CONFIG_DIR.glob(f"{prefix}*.json"))
    raise RunConfigError(f"--config {name_or_path}: no such run config file (presets: {', '.join(names)})")


def load_run_config(name_or_path: str | os.PathLike | None = None, overrides=(), *, kind: type = RunConfig,
                    prefix: str = "train-", default: str = "train-demo"):
    """The run config of class ``kind`` from a file (default: the ``default`` preset, ``train-demo``) with
    ``--set`` overrides applied."""
    path = resolve_run_config_path(name_or_path or default, prefix)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunConfigError(f"{path}: not valid JSON ({e})") from None
    cfg = kind()
    cfg.update(d, source=str(path))
    for text in overrides:
        key, value = parse_override(text)
        cfg.set(key, value, source=f"--set {text}")
    cfg.validate()
    return cfg
