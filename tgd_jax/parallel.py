"""Data parallelism with ``jax.jit`` over a 1-D ``('data',)`` device mesh.

The batch is sharded along its first axis over every device of the mesh; the training
state is replicated. ``jax.jit`` with these ``NamedSharding`` s partitions the step (GSPMD):
gradients and the BatchNorm batch statistics are reduced over the GLOBAL batch, so one
device and N devices compute the same step up to float32 reduction order. Multi-host:
each process passes only its own rows (:func:`shard_batch`), and
``jax.distributed.initialize()`` must have run first (``--config.distributed``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["DATA_AXIS", "make_mesh", "batch_sharding", "replicated", "check_batch_size",
           "local_batch_size", "shard_batch", "replicate", "jit_step"]

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (0: all of them, every host)."""
    devices = jax.devices()
    if num_devices < 0 or num_devices > len(devices):
        raise ValueError(f"num_devices={num_devices}, but {len(devices)} devices exist")
    return Mesh(np.asarray(devices[: num_devices or len(devices)]), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh) -> int:
    """Raises unless the global batch splits evenly over the mesh's devices."""
    n = mesh.devices.size
    if batch_size <= 0 or batch_size % n:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the {n} devices of the mesh; "
            f"use a multiple of {n} (e.g. {max(n, batch_size // n * n)})")
    return batch_size


def local_batch_size(batch_size: int, mesh: Mesh) -> int:
    """Rows of the global batch this process supplies."""
    check_batch_size(batch_size, mesh)
    return batch_size // jax.process_count()


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded along the batch axis."""
    sharding = batch_sharding(mesh)
    out = {}
    for name, local in batch.items():
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        check_batch_size(global_shape[0], mesh)
        out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree (identical on every process) on every device of the mesh."""
    sharding = replicated(mesh)

    def put(x: Any) -> Any:
        # Through host memory, so leaves that alias one buffer (a mask shared by two gates)
        # become distinct buffers: the train step donates every leaf of the state.
        host = np.array(x)
        if jax.process_count() == 1:
            return jax.device_put(host, sharding)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def jit_step(step_fn: Callable[..., Any], mesh: Mesh, *, donate_state: bool = True) -> Callable:
    """``jax.jit`` of ``step_fn(state, batch) -> (state, metrics)`` or ``-> metrics``.

    The state (first argument) is replicated, the batch sharded on ``'data'``; every
    output is replicated. With ``donate_state`` the old state's buffers are reused.
    """
    return jax.jit(
        step_fn,
        in_shardings=(replicated(mesh), batch_sharding(mesh)),
        out_shardings=replicated(mesh),
        donate_argnums=(0,) if donate_state else (),
    )
