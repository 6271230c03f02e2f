"""A package's public names imported on first use (PEP 562 module ``__getattr__``), so that importing a light
part of it (a config, a spec, the command line) does not load JAX until a name that needs it is used."""

import importlib
from typing import Any, Callable, Mapping


def lazy_attributes(package: str, exports: Mapping[str, str], namespace: dict) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``package``: ``exports`` maps a public name to the module that defines it; the
    first use imports it and keeps it in ``namespace`` (the package's ``globals()``)."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
