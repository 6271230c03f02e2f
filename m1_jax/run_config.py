"""Run configs for ``m1 train``: model config name + mesh + optimizer + data + schedule, as JSON.

A run config (a ``train-*.json`` preset or any file) is a nested JSON object whose sections and fields are the
dataclasses below; anything missing takes the default, anything unknown is an error naming the file
and key. Every field can be overridden on the command line with ``--set section.field=value`` (the
value is read as JSON when it parses, else as a string).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from m1_jax.presets import CONFIG_DIR


class RunConfigError(ValueError):
    """A run config or override that cannot be used; the message names the file or flag and the key."""


@dataclasses.dataclass
class ModelSection:
    config: str = "tiny"  # preset name (m1_jax/presets/), or a config.json / checkpoint directory
    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators); master weights are param_dtype
    param_dtype: str = "float32"
    remat: str = "none"  # rematerialisation per layer period: none | full | dots | dots_no_batch
    moe_impl: str = "ragged"
    lightning_impl: str = "auto"
    scan_layers: bool = True
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


SECTIONS = {"model": ModelSection, "optimizer": OptimizerSection, "data": DataSection, "train": TrainSection}


@dataclasses.dataclass
class RunConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "run config") -> "RunConfig":
        if not isinstance(d, dict):
            raise RunConfigError(f"{source}: expected a JSON object with sections {', '.join(SECTIONS)}")
        out = cls()
        for name, values in d.items():
            if name not in SECTIONS:
                raise RunConfigError(f"{source}: unknown section {name!r} (sections: {', '.join(SECTIONS)})")
            if not isinstance(values, dict):
                raise RunConfigError(f"{source}: section {name!r} must be a JSON object")
            for key, value in values.items():
                out.set(f"{name}.{key}", value, source=source)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def set(self, dotted: str, value: Any, source: str = "--set") -> None:
        """Sets ``section.field`` to ``value`` (type-checked against the default's type)."""
        section, _, field = dotted.partition(".")
        if section not in SECTIONS or not field:
            raise RunConfigError(f"{source}: {dotted!r} is not SECTION.FIELD with SECTION one of "
                                 f"{', '.join(SECTIONS)}")
        obj = getattr(self, section)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if field not in fields:
            raise RunConfigError(f"{source}: unknown key {dotted!r} (fields of {section}: {', '.join(fields)})")
        current = getattr(obj, field)
        setattr(obj, field, _coerce(value, current, fields[field].type, f"{source}: {dotted}"))


def _coerce(value, current, annotation, what: str):
    if value is None and "None" in str(annotation):
        return None
    kind = type(current) if current is not None else int
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise RunConfigError(f"{what}: expected true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunConfigError(f"{what}: expected a number, got {value!r}")
        if kind is int and float(value) != int(value):
            raise RunConfigError(f"{what}: expected an integer, got {value!r}")
        return kind(value)
    if not isinstance(value, str):
        raise RunConfigError(f"{what}: expected a string, got {value!r}")
    return value


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


def resolve_run_config_path(name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / f"{name_or_path}.json", CONFIG_DIR / f"train-{name_or_path}.json"):
        if candidate.is_file():
            return candidate
    names = sorted(q.stem for q in CONFIG_DIR.glob("train-*.json"))
    raise RunConfigError(f"--config {name_or_path}: no such run config file (presets: {', '.join(names)})")


def load_run_config(name_or_path: str | os.PathLike | None = None, overrides=()) -> RunConfig:
    """The run config from a file (default: the ``train-demo`` preset) with ``--set`` overrides applied."""
    path = resolve_run_config_path(name_or_path or "train-demo")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunConfigError(f"{path}: not valid JSON ({e})") from None
    cfg = RunConfig.from_dict(d, source=str(path))
    for text in overrides:
        key, value = parse_override(text)
        cfg.set(key, value, source=f"--set {text}")
    return cfg
