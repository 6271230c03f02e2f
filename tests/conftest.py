"""Test setup: 8 emulated CPU devices before JAX initialises, one XLA compilation cache for the session; paths to
the golden vectors and presets."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One XLA compilation cache for the session, shared by pytest-xdist's workers and by the subprocesses the tests
# start (they inherit the environment): many tests compile the same tiny models' steps. An entry is keyed on
# the computation itself (its HLO, compile options, devices and the JAX version), so changed code compiles
# anew. A JAX_COMPILATION_CACHE_DIR set beforehand is used (and kept) as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _xla_cache = tempfile.mkdtemp(prefix="m1-jax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
    atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)  # by the process that made it
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The tests compile many small programs and run each briefly: LLVM's optimisation of the CPU code costs more
# time than it saves there (measured: test_model + test_cache 76 s -> 58 s). It changes how the code is
# generated, not what XLA computes; the benchmarks and the users' runs keep the default.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

from m1_jax.presets import CONFIG_DIR  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The golden vectors ship with the tests (tests/data/golden/README.md); M1_GOLDEN_DIR points elsewhere.
GOLDEN = Path(os.environ.get("M1_GOLDEN_DIR", REPO / "tests" / "data" / "golden"))


def pytest_configure(config):
    # Executables compiled for a TPU topology (AOT, on a host without TPU chips) are written to the cache but
    # cannot be loaded back on this host: JAX warns and compiles them again, as it would without a cache.
    config.addinivalue_line("filterwarnings",
                            "ignore:Error reading persistent compilation cache entry:UserWarning")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    case = GOLDEN / "caseA"
    if not case.is_dir():
        pytest.fail(f"golden vectors not found at {case} (set M1_GOLDEN_DIR)")
    return case


@pytest.fixture(scope="session")
def configs_dir() -> Path:
    return CONFIG_DIR
