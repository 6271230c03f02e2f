"""Which platform the kernels are traced for: the host's backend, or a TPU target compiled from another host.

The Pallas kernels (lightning attention, softmax splash attention) run when tracing for TPU: on a TPU
backend, or inside :func:`tpu_target` when a CPU host lowers a program for abstract TPU devices
(ahead-of-time compilation, ``m1 aot``). There they lower through Mosaic rather than interpret mode.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

__all__ = ["targeting_tpu", "tpu_target"]

_TPU_TARGET = contextvars.ContextVar("pallas_kernels_tpu_target", default=False)


@contextlib.contextmanager
def tpu_target() -> Iterator[None]:
    """Trace for a TPU target from a non-TPU host (ahead-of-time compilation).

    Inside this context the kernels' automatic choices pick the Pallas TPU kernels, lowered
    through Mosaic (interpret mode off) even when the host backend is CPU: use it around
    ``jax.jit(...).lower(...)`` for abstract TPU devices.
    """
    token = _TPU_TARGET.set(True)
    try:
        yield
    finally:
        _TPU_TARGET.reset(token)


def targeting_tpu() -> bool:
    """True on a TPU backend or inside :func:`tpu_target`."""
    return _TPU_TARGET.get() or jax.default_backend() == "tpu"
