"""The package as users get it: a wheel built from the sources, installed non-editable, run from another
directory. The presets (model configs and run configs) must ship inside it."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from m1_jax.presets import CONFIG_DIR

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "m1_jax", "pallas_kernels")
PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input")


def _pip(*args, cwd):
    proc = subprocess.run([*PIP, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the sources (the build leaves nothing in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    (path,) = (tmp / "dist").glob("*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """(site dir, environment, working directory): the wheel installed into its own directory, an
    environment whose imports of ``m1_jax`` can only resolve there, and a directory outside the checkout."""
    tmp = tmp_path_factory.mktemp("installed")
    site = tmp / "site"
    _pip("install", "--no-deps", "--target", str(site), str(wheel), cwd=tmp)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1", "JAX_PLATFORMS": "cpu"}
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return site, env, cwd


def _python(installed, *args, timeout=120):
    _, env, cwd = installed
    proc = subprocess.run([sys.executable, "-P", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_wheel_holds_every_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(p.name for p in CONFIG_DIR.glob("*.json"))
    assert "minimax-m1-40k.json" in presets and "train-demo.json" in presets
    missing = [p for p in presets if f"m1_jax/presets/{p}" not in names]
    assert not missing, f"presets missing from {wheel.name}: {missing}"


def test_installed_package_is_the_wheels(installed):
    site = installed[0].resolve()
    out = _python(installed, "-c", "import json, m1_jax, m1_jax.presets, pallas_kernels; print(json.dumps("
                  "[m1_jax.__file__, str(m1_jax.presets.CONFIG_DIR), pallas_kernels.__file__]))")
    for path in json.loads(out):
        assert Path(path).resolve().is_relative_to(site), (path, site)


def test_info_from_another_directory(installed):
    out = _python(installed, "-m", "m1_jax.cli", "info", "minimax-m1-40k")
    assert "456,089,655,296" in out, out
    site, env, cwd = installed
    script = site / "bin" / "m1"  # the console script the wheel declares
    proc = subprocess.run([sys.executable, "-P", str(script), "info", "tiny", "--json"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["config"]["hidden_size"] == 64


@pytest.mark.slow
def test_train_from_another_directory(installed):
    """``m1 train`` with the default run config (the ``train-demo`` preset), shortened: two steps of
    32 tokens compiled without XLA's backend optimisations, a 4-token sample from the saved checkpoint."""
    workdir = installed[2] / "run"
    out = _python(installed, "-m", "m1_jax.cli", "train", "--steps", "2", "--workdir", str(workdir),
                  "--no-progress", "--set", "data.seq_len=32", "--set", "train.sample_tokens=4",
                  "--set", "train.fast_compile=true", timeout=600)
    assert "trained steps 1..2" in out and "sample from the checkpoint" in out, out
    assert (workdir / "checkpoints" / "2").is_dir()
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
