"""Multi-process start-up: JAX's own runtime (`jax.distributed`), configured by launch.sh.

launch.sh sets MOEJAX_DISTRIBUTED to "local" (N processes on this machine, with MOEJAX_COORDINATOR,
MOEJAX_NUM_PROCESSES, MOEJAX_PROCESS_ID) or "auto" (a Cloud TPU VM slice or a SLURM job, where
`jax.distributed.initialize()` finds its peers by itself). Unset: a single process, nothing to do.
"""

from __future__ import annotations

import os

import jax


def initialize_from_env() -> None:
    """Call once at the start of an experiment, before anything touches a device."""
    mode = os.environ.get("MOEJAX_DISTRIBUTED", "")
    if not mode:
        return
    if mode == "auto":
        jax.distributed.initialize()
        return
    if mode != "local":
        raise ValueError(f"MOEJAX_DISTRIBUTED={mode!r}: expected 'local' or 'auto'")
    missing = [v for v in ("MOEJAX_COORDINATOR", "MOEJAX_NUM_PROCESSES", "MOEJAX_PROCESS_ID") if v not in os.environ]
    if missing:
        raise ValueError(f"MOEJAX_DISTRIBUTED=local needs {missing} (launch.sh --processes sets them)")
    # the CPU backend's cross-process collectives (accelerator backends bring their own)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ["MOEJAX_COORDINATOR"],
                               num_processes=int(os.environ["MOEJAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["MOEJAX_PROCESS_ID"]))
