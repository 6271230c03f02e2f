"""Test setup: 8 emulated CPU devices before JAX initialises; paths to the golden vectors and presets."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

from m1_jax.presets import CONFIG_DIR  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The golden vectors ship with the tests (tests/data/golden/README.md); M1_GOLDEN_DIR points elsewhere.
GOLDEN = Path(os.environ.get("M1_GOLDEN_DIR", REPO / "tests" / "data" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    case = GOLDEN / "caseA"
    if not case.is_dir():
        pytest.fail(f"golden vectors not found at {case} (set M1_GOLDEN_DIR)")
    return case


@pytest.fixture(scope="session")
def configs_dir() -> Path:
    return CONFIG_DIR
