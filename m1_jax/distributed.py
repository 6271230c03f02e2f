"""Process and device setup, done before JAX initialises its backends.

* Several processes (``--num-processes``/``--process-id``/``--coordinator`` or the environment
  variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``):
  ``jax.distributed.initialize``; CPU processes exchange data through gloo.
* CPU: the number of emulated CPU devices per process (``jax_num_cpu_devices``), so that a mesh such as
  ``data=2,fsdp=2,expert=2`` has its devices on a CPU-only machine. On TPU/GPU this setting only
  concerns the unused CPU backend.
"""

from __future__ import annotations

import math
import os

from m1_jax.sharding import parse_mesh_spec


def mesh_devices(spec: str) -> int | None:
    """Devices a mesh spec needs, or None when an axis is -1 (the rest)."""
    sizes = parse_mesh_spec(spec)
    return None if -1 in sizes.values() else math.prod(sizes.values())


def setup(*, mesh: str | None = None, coordinator: str | None = None, num_processes: int | None = None,
          process_id: int | None = None, cpu_devices: int | None = None) -> None:
    """Configures JAX for this process; must run before anything touches a device."""
    import jax

    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    processes = num_processes or 1
    if cpu_devices is None and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        needed = mesh_devices(mesh) if mesh else None
        if needed is not None and needed % processes:
            raise ValueError(f"--mesh {mesh}: {needed} devices cannot be split over {processes} processes")
        cpu_devices = needed // processes if needed else None
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if processes > 1:
        if coordinator is None or process_id is None:
            raise ValueError("--num-processes > 1 needs --coordinator HOST:PORT and --process-id "
                             "(or JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID)")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=processes,
                                   process_id=process_id)
