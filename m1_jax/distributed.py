"""Process and device setup, done before JAX initialises its backends.

* Several processes (``--num-processes``/``--process-id``/``--coordinator`` or the environment
  variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``):
  ``jax.distributed.initialize``; CPU processes exchange data through gloo.
* CPU: the number of emulated CPU devices per process (``jax_num_cpu_devices``), so that a mesh such as
  ``data=2,fsdp=2,expert=2`` has its devices on a CPU-only machine (an axis of -1 then takes what the
  other axes leave: ``fsdp=-1,expert=8`` runs on 8 emulated devices). On TPU/GPU this setting only
  concerns the unused CPU backend.
* A host without TPU chips: libtpu (the ``[tpu]`` extra) still probes for a TPU slice whenever JAX
  starts its backends or builds a TPU topology (``m1 aot``), and prints errors about the host bounds
  and ``TPU_WORKER_HOSTNAMES`` it cannot find; :func:`quiet_absent_tpu` gives it the answer for such a
  host (one host, no workers elsewhere), so that it stays quiet.
"""

from __future__ import annotations

import glob
import math
import os

# What libtpu would otherwise look up (and complain about) on a host without TPU chips: a slice of one
# host. It changes nothing on such a host: no TPU backend can start, and AOT topologies are named in full.
LIBTPU_SINGLE_HOST_ENV = {"TPU_HOST_BOUNDS": "1,1,1", "TPU_WORKER_HOSTNAMES": "localhost"}
# Settings by which a user chooses the TPU runtime's behaviour: when any is set, it is left alone.
TPU_USER_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_HOST_BOUNDS", "TPU_CHIPS_PER_HOST_BOUNDS", "TPU_WORKER_HOSTNAMES",
                "TPU_WORKER_ID", "JAX_FORCE_TPU_INIT")
GOOGLE_PCI_VENDOR = "0x1ae0"


def tpu_chips_present() -> bool:
    """Whether TPU chips are attached to this host, found as JAX finds them (PCI devices), without
    loading libtpu or starting a backend."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    break
        except OSError:
            continue
    else:
        return False  # no Google PCI device at all, so no TPU (checked without importing JAX)
    try:  # a Google PCI device is a TPU or, on a cloud VM, e.g. the network card: JAX's probe tells which
        from jax._src import hardware_utils  # lazy: only on such hosts, keeping CLI startup free of JAX
    except ImportError:
        return True  # cannot tell: assume a TPU, so that nothing of its runtime is hidden
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def quiet_absent_tpu() -> bool:
    """On a host without TPU chips, sets :data:`LIBTPU_SINGLE_HOST_ENV` so that libtpu does not print
    errors while it looks for a TPU slice. Leaves everything as it is when the user chose TPU settings
    (:data:`TPU_USER_ENV`) or a ``JAX_PLATFORMS`` that names ``tpu``. Returns whether it set them."""
    if "tpu" in os.environ.get("JAX_PLATFORMS", "").lower() or any(k in os.environ for k in TPU_USER_ENV):
        return False
    if tpu_chips_present():
        return False
    os.environ.update(LIBTPU_SINGLE_HOST_ENV)
    return True


def mesh_devices(spec: str, processes: int = 1) -> int:
    """Devices a mesh spec needs; with an axis of -1 (the rest), the fewest that the other axes and
    ``processes`` equal shares allow (e.g. 8 for ``fsdp=-1,expert=8``: fsdp then has size 1)."""
    from m1_jax.sharding import parse_mesh_spec  # lazy: the CLI imports this module before JAX is needed

    sizes = parse_mesh_spec(spec)
    known = math.prod(v for v in sizes.values() if v != -1)
    return math.lcm(known, processes) if -1 in sizes.values() else known


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
        needed = mesh_devices(mesh, processes) if mesh else None
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
