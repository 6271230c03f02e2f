"""The tools under test, imported from their files (``tools/`` is not a package): ``load_tool("bench_rl")``."""

import importlib.util
from pathlib import Path

TOOLS = Path(__file__).parents[2] / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
