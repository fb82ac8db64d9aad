"""Data parallelism: a 1-D device mesh, two compilations of one per-device step, host data.

A train step is written once, for one device: it sees its own slice of the
batch and averages gradients with ``lax.pmean(..., AXIS)``. `DataParallel`
compiles it either as ``jax.jit(jax.shard_map(...))`` over a 1-D mesh of all
devices (``parallelism="shard_map"``, the default) or with ``jax.pmap``
(``parallelism="pmap"``); both give the same numbers.

State layouts. The *global* form of a replicated pytree (params, optimizer
state) is a tree of `jax.Array` s fully replicated over the mesh; the
checkpoints and the samplers use it. The shard_map step takes the global form
directly; the pmap step takes the *device* form, each leaf with a leading axis
of the local device count. `to_device` and `to_global` convert between them
(the identity for shard_map).

Batches. Each process holds its own ``[k, b_proc, ...]`` slice of ``k``
global batches (``b_proc = global_batch / process_count``); `shard_batch`
turns it into the step's input without moving data between processes: a
global ``[k, B, ...]`` array sharded on axis 1 (shard_map) or a
``[local_devices, k, b_dev, ...]`` array (pmap). Device ``i`` of the mesh
(``jax.devices()`` order) gets rows ``[i * b_dev, (i + 1) * b_dev)`` of the
global batch in both cases.

Multi-host. `initialize_distributed` calls ``jax.distributed.initialize`` when
the run is launched as several processes: with an explicit coordinator
address / process count / process id (flags or the ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` environment variables), or, with
``auto=True``, from the cluster environment JAX detects by itself (Cloud TPU
pods, SLURM, Open MPI). On CPU it selects the gloo collectives.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import conv

AXIS = "data"
PARALLELISMS = ("shard_map", "pmap")

PyTree = Any


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Joins a multi-process run if the arguments or the environment ask for one.

    Args:
      coordinator_address: "host:port" of process 0's coordinator (default:
        the ``JAX_COORDINATOR_ADDRESS`` environment variable).
      num_processes: number of processes (default ``JAX_NUM_PROCESSES``).
      process_id: this process, 0..num_processes-1 (default ``JAX_PROCESS_ID``).
      auto: call ``jax.distributed.initialize()`` with no arguments and let JAX
        detect the cluster (Cloud TPU pods, SLURM, Open MPI).

    Returns:
      True if ``jax.distributed.initialize`` was called.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    explicit = (coordinator_address, num_processes, process_id)
    if not auto and all(v is None for v in explicit):
        return False
    if not auto and any(v is None for v in explicit):
        raise ValueError(
            "a multi-process launch needs all of coordinator_address (host:port), "
            "num_processes and process_id (flags or JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES, JAX_PROCESS_ID), or auto=True on a cluster JAX detects."
        )
    if _platform_is_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto and all(v is None for v in explicit):
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def _platform_is_cpu() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
    return platforms.split(",")[0].strip() == "cpu"


class DataParallel:
    """Compiles a per-device step and moves state and batches to the devices.

    Attributes:
      parallelism: "shard_map" or "pmap".
      mesh: the 1-D ``Mesh`` of all devices, axis name ``AXIS``.
      num_devices: devices over all processes.
      num_local_devices: devices of this process.
    """

    def __init__(self, parallelism: str = "shard_map", devices: list | None = None):
        """Builds the 1-D mesh.

        Args:
          parallelism: "shard_map" or "pmap".
          devices: the devices of the mesh, default ``jax.devices()``. Other
            devices, e.g. the compile-only devices of a TPU topology
            (``jax.experimental.topologies``), make a step that can be lowered
            and compiled ahead of time for them (benchmarks/tpu_aot.py).
        """
        if parallelism not in PARALLELISMS:
            raise ValueError(
                f"config.parallelism={parallelism!r} is unknown; allowed: {PARALLELISMS}."
            )
        self.parallelism = parallelism
        self._pmap_devices = None
        if devices is None:
            self.mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
            self.num_devices = jax.device_count()
            self.num_local_devices = jax.local_device_count()
            self._local_mesh = Mesh(np.asarray(jax.local_devices()), (AXIS,))
        else:
            devices = list(devices)
            local = [d for d in devices if d.process_index == jax.process_index()] or devices
            self.mesh = Mesh(np.asarray(devices), (AXIS,))
            self.num_devices = len(devices)
            self.num_local_devices = len(local)
            self._local_mesh = Mesh(np.asarray(local), (AXIS,))
            self._pmap_devices = devices

    @property
    def replicated(self) -> NamedSharding:
        """Sharding of the global form: a full copy on every device."""
        return NamedSharding(self.mesh, P())

    def local_batch_size(self, global_batch_size: int) -> int:
        """Per-process batch; ValueError unless it divides over the devices."""
        if global_batch_size < 1 or global_batch_size % self.num_devices:
            lower = max(self.num_devices, global_batch_size // self.num_devices * self.num_devices)
            raise ValueError(
                f"training.batch_size={global_batch_size} (global) must be a positive multiple "
                f"of the device count {self.num_devices}; use e.g. "
                f"--config.training.batch_size={lower}."
            )
        return global_batch_size // jax.process_count()

    # ------------------------------------------------------------------ state

    def replicate(self, tree: PyTree) -> PyTree:
        """Host (numpy) or single-device pytree -> global form, the same on every process."""

        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, self.replicated, lambda idx: x[idx])

        return jax.tree.map(put, tree)

    def to_device(self, tree: PyTree) -> PyTree:
        """Global form -> the form the compiled step takes."""
        if self.parallelism == "shard_map":
            return tree
        n = self.num_local_devices
        sharding = NamedSharding(self._local_mesh, P(AXIS))

        def put(x):
            local = np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
            return jax.device_put(np.broadcast_to(local[None], (n, *local.shape)), sharding)

        return jax.tree.map(put, tree)

    def to_global(self, tree: PyTree) -> PyTree:
        """The step's form -> global form (a copy for pmap, the identity for shard_map)."""
        if self.parallelism == "shard_map":
            return tree
        return self.replicate(jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree))

    def first(self, tree: PyTree) -> PyTree:
        """This process's copy of a replicated pytree in the step's form, as numpy."""
        if self.parallelism == "shard_map":
            return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)

    # ---------------------------------------------------------------- batches

    def shard_batch(self, local: PyTree) -> PyTree:
        """Process-local ``[k, b_proc, ...]`` arrays -> the step's batch input."""
        if self.parallelism == "shard_map":
            sharding = NamedSharding(self.mesh, P(None, AXIS))
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
            )
        n = self.num_local_devices
        sharding = NamedSharding(self._local_mesh, P(AXIS))

        def put(x):
            x = np.asarray(x)
            k, b = x.shape[:2]
            x = x.reshape(k, n, b // n, *x.shape[2:]).swapaxes(0, 1)
            return jax.device_put(x, sharding)

        return jax.tree.map(put, local)

    # ---------------------------------------------------------------- compile

    def compile_step(self, step_fn: Callable, *, donate_state: bool = True) -> Callable:
        """Compiles ``step_fn(state, batch, key) -> (state, metrics)`` for all devices.

        ``step_fn`` runs on one device: ``batch`` leaves are ``[k, b_dev, ...]``,
        ``state`` and ``key`` are replicated, and it must return a replicated
        state and replicated metrics (averaged with ``lax.pmean`` over AXIS).
        The state argument is donated unless donate_state is False. On CPU the
        shard_map form compiles with `ddpm_jax.conv.compiler_options` (``jax.pmap``
        takes no compiler options).
        """
        donate = (0,) if donate_state else ()
        if self.parallelism == "pmap":
            return jax.pmap(step_fn, axis_name=AXIS, in_axes=(0, 0, None),
                            donate_argnums=donate, devices=self._pmap_devices)
        sharded = jax.shard_map(step_fn, mesh=self.mesh, in_specs=(P(), P(None, AXIS), P()),
                                out_specs=(P(), P()))
        return jax.jit(sharded, donate_argnums=donate,
                       compiler_options=conv.compiler_options(self.mesh.devices.flat))
