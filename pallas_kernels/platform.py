"""Which platform the kernels are traced for: the host's backend, or a TPU / GPU target compiled from another host.

The Pallas kernels (lightning attention, softmax splash attention) run when tracing for TPU: on a TPU
backend, or inside :func:`tpu_target` when a CPU host lowers a program for abstract TPU devices
(ahead-of-time compilation, ``m1 aot``). There they lower through Mosaic rather than interpret mode.
The GPU lightning kernels (Pallas' Triton backend) run when tracing for GPU: on a GPU backend, or
inside :func:`gpu_target` when a CPU host lowers a program for CUDA (``lowering_platforms=("cuda",)``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

__all__ = ["gpu_target", "targeting_gpu", "targeting_tpu", "tpu_target"]

_TPU_TARGET = contextvars.ContextVar("pallas_kernels_tpu_target", default=False)
_GPU_TARGET = contextvars.ContextVar("pallas_kernels_gpu_target", default=False)


@contextlib.contextmanager
def _target(var: contextvars.ContextVar) -> Iterator[None]:
    token = var.set(True)
    try:
        yield
    finally:
        var.reset(token)


def tpu_target() -> contextlib.AbstractContextManager[None]:
    """Trace for a TPU target from a non-TPU host (ahead-of-time compilation).

    Inside this context the kernels' automatic choices pick the Pallas TPU kernels, lowered
    through Mosaic (interpret mode off) even when the host backend is CPU: use it around
    ``jax.jit(...).lower(...)`` for abstract TPU devices.
    """
    return _target(_TPU_TARGET)


def gpu_target() -> contextlib.AbstractContextManager[None]:
    """Trace for an NVIDIA GPU target from a non-GPU host.

    Inside this context the lightning op's automatic choice picks the Pallas GPU kernels, lowered
    through Triton (interpret mode off) even when the host backend is CPU: use it around
    ``jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))``.
    """
    return _target(_GPU_TARGET)


def targeting_tpu() -> bool:
    """True on a TPU backend or inside :func:`tpu_target`."""
    return _TPU_TARGET.get() or jax.default_backend() == "tpu"


def targeting_gpu() -> bool:
    """True on a GPU backend or inside :func:`gpu_target` (and not inside :func:`tpu_target`)."""
    return not _TPU_TARGET.get() and (_GPU_TARGET.get() or jax.default_backend() == "gpu")
