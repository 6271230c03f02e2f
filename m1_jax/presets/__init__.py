"""Named configs shipped inside the package, as JSON files beside this module.

Model presets (``minimax-m1-40k``, ``tiny``, ...) and run configs for ``m1 train`` (``train-*.json``) and
``m1 rl`` (``rl-*.json``)."""

from __future__ import annotations

import os
from pathlib import Path

from m1_jax.config import ConfigError, M1Config

CONFIG_DIR = Path(__file__).resolve().parent
RUN_CONFIG_PREFIXES = ("train-", "rl-")  # run configs, not model presets


def preset_names() -> list[str]:
    """Model preset names (run configs excluded)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json") if not p.stem.startswith(RUN_CONFIG_PREFIXES))


def resolve_config(name_or_path: str | os.PathLike) -> M1Config:
    """A config.json path, a checkpoint directory holding one, or a preset name (:func:`preset_names`)."""
    p = Path(name_or_path)
    if p.is_dir() or p.suffix == ".json" or p.exists():
        return M1Config.from_json(p)
    candidate = CONFIG_DIR / f"{name_or_path}.json"
    if candidate.is_file():
        return M1Config.from_json(candidate)
    raise ConfigError(f"{name_or_path}: no such config file, checkpoint directory or preset "
                      f"(presets: {', '.join(preset_names()) or 'none'})")
