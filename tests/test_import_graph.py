"""The import graph of the packages has no cycle (``tools/import_graph.py``), and the tool finds one."""

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).parents[1] / "tools" / "import_graph.py"


def run_tool(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), "--root", str(root)], capture_output=True, text=True)


def test_the_packages_import_without_cycles():
    proc = run_tool(TOOL.parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no import cycle" in proc.stdout


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    pkg = tmp_path / "m1_jax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from m1_jax.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n    return c\n")
    (pkg / "c.py").write_text("import m1_jax.a as a\n")
    (pkg / "d.py").write_text("from m1_jax.a import f\n")  # imports into the cycle, is not in it
    (tmp_path / "pallas_kernels").mkdir()
    (tmp_path / "pallas_kernels" / "__init__.py").write_text("")
    proc = run_tool(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "m1_jax.a <-> m1_jax.c <-> m1_jax.sub.b" in proc.stdout
    assert "m1_jax/sub/b.py:2  m1_jax.sub.b -> m1_jax.c  (inside a function)" in proc.stdout
    assert "m1_jax.d" not in proc.stdout.split("cycle(s):")[1]
    (pkg / "c.py").write_text("")
    proc = run_tool(tmp_path)
    assert proc.returncode == 0 and "m1_jax/sub/b.py:2  m1_jax.sub.b -> m1_jax.c" in proc.stdout


def test_layers_take_only_types_from_the_inference_cache():
    """The layers see the inference cache through its types; its machinery (init, shardings) stays above them."""
    import ast

    allowed = {"CacheStep", "CacheLayers", "LayerCache"}
    for path in (TOOL.parents[1] / "m1_jax" / "layers").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "m1_jax.cache":
                assert {a.name for a in node.names} <= allowed, f"{path.name} imports {[a.name for a in node.names]}"
            if isinstance(node, ast.Import):
                assert all(a.name != "m1_jax.cache" for a in node.names), path.name
