"""Data parallelism: one ``Mesh`` over every device, batch sharded on ``'data'``, state replicated.

Multi-host: call :func:`maybe_initialize_distributed` first (it reads the standard
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables, or the
cluster environment JAX detects by itself) and starts the fail-stop watchdog
(``histo_jax.failstop``); each process then feeds its own slice of the global batch and
:func:`global_batch` assembles the sharded global array.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # its client has no public handle
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from histo_jax import failstop


def maybe_initialize_distributed(failure_timeout_s: float = failstop.DEFAULT_TIMEOUT_S) -> None:
    """Initialises multi-process JAX when the environment asks for it, and starts the
    watchdog that stops every process within about ``failure_timeout_s`` of one failing
    (``histo_jax.failstop``); no-op with one process."""
    if not jax.distributed.is_initialized():
        addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
        if not addr:
            return
        jax.distributed.initialize(
            coordinator_address=addr,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            # JAX's own failure detection, a backstop behind the watchdog.
            heartbeat_timeout_seconds=math.ceil(2 * failure_timeout_s),
        )
    if jax.process_count() > 1 and failstop.active() is None:
        failstop.start(jax_distributed.global_state.client, jax.process_index(),
                       jax.process_count(), failure_timeout_s)


def make_mesh(devices=None) -> Mesh:
    """A 1-D ``'data'`` mesh over ``devices`` (default: every device of every process)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def check_batch_size(global_batch: int, what: str = "batch_size", mesh: Mesh | None = None) -> int:
    """Returns the per-process batch; explains the fix when the batch does not divide."""
    n_dev = mesh.size if mesh is not None else jax.device_count()
    n_proc = jax.process_count()
    if global_batch % n_dev:
        raise ValueError(
            f"config.{what}={global_batch} does not divide by the {n_dev} devices in use. "
            f"Set --config.{what} to a multiple of {n_dev} (e.g. {((global_batch // n_dev) or 1) * n_dev}), "
            f"or limit the devices (CUDA_VISIBLE_DEVICES, or XLA_FLAGS device count on CPU).")
    return global_batch // n_proc


def global_batch(mesh: Mesh, local: dict) -> dict:
    """Turns this process's slice of a batch (numpy) into global arrays sharded over 'data'."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def to_host(x) -> np.ndarray:
    """Fetches a (possibly multi-host sharded) global array to numpy on every process."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
