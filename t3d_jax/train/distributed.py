"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

Call `initialize(...)` before anything touches a JAX device. Three cases:

* flags given (`--coordinator_address host:port --num_processes N --process_id i`): used as is
  (GPU nodes without a scheduler, or the local two-process CPU test);
* no flags, but a cluster environment JAX recognises (TPU VM pod slices, SLURM, Open MPI,
  or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID): JAX's own auto-detection;
* neither: a single process, nothing to do.

On CPU, cross-process collectives need an implementation: gloo is selected, so several
local processes with fake CPU devices form one job (how multi-host is tested here).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_count: int | None = None,
               platform: str | None = None) -> bool:
    """Initialises the distributed runtime if this is a multi-process job; True if it did.

    `local_device_count` (CPU only) sets the number of fake CPU devices of this process.
    """
    platform = platform or os.environ.get("JAX_PLATFORMS", "")
    if local_device_count:
        jax.config.update("jax_num_cpu_devices", int(local_device_count))
    explicit = coordinator_address or (num_processes and int(num_processes) > 1)
    if explicit:
        if not (coordinator_address and num_processes and process_id is not None):
            raise ValueError("multi-process training needs all of --coordinator_address, "
                             "--num_processes and --process_id (or none of them)")
        if platform.startswith("cpu") or "cpu" == platform:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=int(num_processes), process_id=int(process_id))
    elif any(k in os.environ for k in _CLUSTER_ENV) and os.environ.get("T3D_NO_AUTO_DISTRIBUTED") != "1":
        jax.distributed.initialize()  # JAX's cluster auto-detection
    else:
        return False
    log.info("distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
