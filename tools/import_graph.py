"""The import graph of ``m1_jax`` and ``pallas_kernels``: cycles, and the imports made inside functions.

Reads the source with :mod:`ast` (nothing is imported), takes every import of one of the two packages,
at module level or inside a function, as an edge from the importing module to the imported one, and
prints:

* each cycle: a strongly connected component of more than one module, with the import lines that close it;
* every function-local import of a module of the two packages, as ``file:line  importer -> imported``
  (such an import is legitimate when it keeps a heavy dependency such as JAX off a light code path, never
  when it only hides a cycle; the cycle check counts it like any other import).

Exits 1 when there is a cycle, else 0::

    python tools/import_graph.py [--root REPO]
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from dataclasses import dataclass

PACKAGES = ("m1_jax", "pallas_kernels")


@dataclass(frozen=True)
class Edge:
    src: str  # importing module
    dst: str  # imported module
    file: str  # path relative to the root
    line: int
    local: bool  # inside a function


def module_files(root: str) -> dict[str, str]:
    """Dotted module name -> file path, for every ``.py`` file of the packages under ``root``."""
    out = {}
    for package in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, package)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                parts = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    return out


def _resolve(modules: set[str], name: str) -> str | None:
    """The longest known module that ``name`` (a module or a name inside one) starts with."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """The modules of the packages an import statement loads (``from a import b``: ``a.b`` if a module, else ``a``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" for alias in node.names]  # a name that is no module resolves to base
    found = {_resolve(modules, n) for n in names if n.split(".")[0] in PACKAGES}
    return sorted(m for m in found if m and m != module)


def _walk(tree: ast.AST):
    """``(import node, inside a function)`` for every import statement in ``tree``."""
    stack = [(tree, False)]
    while stack:
        node, local = stack.pop()
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, local
            stack.append((child, inner))


def build_graph(root: str) -> tuple[dict[str, str], list[Edge]]:
    files = module_files(root)
    modules = set(files)
    edges = []
    for module, path in sorted(files.items()):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        is_package = os.path.basename(path) == "__init__.py"
        for node, local in _walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            for target in _targets(node, module, is_package, modules):
                edges.append(Edge(module, target, os.path.relpath(path, root), node.lineno, local))
    edges.sort(key=lambda e: (e.file, e.line, e.dst))
    return files, edges


def cycles(modules: list[str], edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    succ: dict[str, list[str]] = {m: [] for m in modules}
    for e in edges:
        if e.dst not in succ[e.src]:
            succ[e.src].append(e.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out = []
    for start in sorted(modules):
        if start in index:
            continue
        work = [(start, iter(succ[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(succ[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return sorted(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
                   help="repository root holding the packages (default: this tool's repository)")
    args = p.parse_args(argv)
    root = os.path.abspath(args.root)
    files, edges = build_graph(root)
    found = cycles(list(files), edges)
    local = [e for e in edges if e.local]
    print(f"{len(files)} modules, {len(edges)} imports within {' and '.join(PACKAGES)}, "
          f"{len(local)} of them inside functions")
    print("\nfunction-local imports:" if local else "\nno function-local imports")
    for e in local:
        print(f"  {e.file}:{e.line}  {e.src} -> {e.dst}")
    if not found:
        print("\nno import cycle")
        return 0
    print(f"\n{len(found)} import cycle(s):")
    for component in found:
        members = set(component)
        print(f"  {' <-> '.join(component)}")
        for e in edges:
            if e.src in members and e.dst in members:
                print(f"    {e.file}:{e.line}  {e.src} -> {e.dst}{'  (inside a function)' if e.local else ''}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
