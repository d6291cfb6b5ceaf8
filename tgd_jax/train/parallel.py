"""Data parallelism with ``jax.jit`` over a 1-D ``('data',)`` device mesh.

The batch is sharded along its first axis over every device of the mesh; the training
state is replicated. ``jax.jit`` with these ``NamedSharding`` s partitions the step (GSPMD):
gradients and the BatchNorm batch statistics are reduced over the GLOBAL batch, so one
device and N devices compute the same step up to float32 reduction order. Several
processes: :func:`init_distributed` joins them first (the commands' ``--coordinator_address``,
``--num_processes``, ``--process_id``), and each process makes and passes only its own rows
of the global batch (:func:`process_rows`, :func:`shard_batch`).
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tgd_jax.io.errors import UsageError

__all__ = ["DATA_AXIS", "use_cpu_cores", "usable_cores", "cpu_device_count", "make_mesh",
           "batch_sharding",
           "replicated", "check_batch_size", "local_batch_size", "process_rows", "shard_batch",
           "replicate", "host_copy", "jit_step", "one_step_in_flight", "init_distributed",
           "free_port", "multi_process", "barrier", "gather_from_processes",
           "broadcast_from_first", "COLLECTIVE_FAILURES", "check_coordinator_port"]

#: The name of the mesh axis the batch is sharded along.
DATA_AXIS = "data"
#: Environment variable that overrides the number of CPU devices chosen by use_cpu_cores.
CPU_DEVICES_ENV = "TGD_CPU_DEVICES"


def cpu_device_count(batch_size: int, cores: int) -> int:
    """The largest device count <= ``cores`` that divides ``batch_size`` (at least 1)."""
    if batch_size <= 0:
        raise UsageError(f"batch_size must be positive, got {batch_size}")
    return max(d for d in range(1, max(1, cores) + 1) if batch_size % d == 0)


def usable_cores(cpu_max: str | Path = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may use: its affinity mask (``taskset``, SLURM's binding),
    capped by a cgroup v2 CPU quota (containers, Kubernetes limits) rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 limit readable here: the mask alone
        pass
    return cores


def use_cpu_cores(batch_size: int, requested: int | None = None, *, default: int = 0) -> int:
    """Splits the CPU into several JAX host devices, so the data-parallel step uses every core.

    With one device per core, the ``('data',)`` mesh shards the batch over them and the
    step computes the same update up to float32 reduction order (gradients and BatchNorm
    statistics are reduced over the global batch): a run's numbers depend on its device
    count, so the same command gives the same numbers on the same machine (and the count
    is recorded in the workdir). The commands use every core by default; ``reproduce.py``
    runs one single-device job per core instead (``$TGD_CPU_DEVICES=1`` for its jobs).
    Must run before JAX initialises its backends; no effect on GPU/TPU.

    Args:
      batch_size: the global batch; the automatic count is the largest divisor of it that
        does not exceed :func:`usable_cores` (so the batch splits evenly).
      requested: devices asked for (``--cpu_devices``): 0 = one per core (automatic),
        None = ``$TGD_CPU_DEVICES`` if set, else ``default``.
      default: the count when neither ``requested`` nor ``$TGD_CPU_DEVICES`` says (0 = one
        per core; multi-process runs, and the experiments whose published numbers were
        measured on one device, pass 1).

    Returns:
      The number of CPU devices set (or already forced by ``XLA_FLAGS``, which wins).
    """
    forced = re.search(r"xla_force_host_platform_device_count=(\d+)",
                       os.environ.get("XLA_FLAGS", ""))
    if forced:
        return int(forced.group(1))
    if requested is None:
        value = os.environ.get(CPU_DEVICES_ENV, "") or str(default)
        try:
            requested = int(value)
        except ValueError:
            raise UsageError(f"${CPU_DEVICES_ENV}={value!r} is not an integer") from None
    if requested < 0:
        raise UsageError(f"cpu_devices must be >= 0 (0 = one per core), got {requested}")
    if requested:
        n = requested
    else:
        n = cpu_device_count(batch_size, usable_cores())
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:  # JAX already made its devices: too late to split the CPU
        raise RuntimeError(f"cannot set {n} CPU devices (call use_cpu_cores before any JAX "
                           f"array exists): {e}") from None
    return n


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (0: all of them, every host)."""
    devices = jax.devices()
    if num_devices < 0 or num_devices > len(devices):
        raise UsageError(f"num_devices={num_devices}, but {len(devices)} devices exist")
    return Mesh(np.asarray(devices[: num_devices or len(devices)]), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh) -> int:
    """Raises unless the global batch splits evenly over the mesh's devices."""
    n = mesh.devices.size
    if batch_size <= 0 or batch_size % n:
        raise UsageError(
            f"batch_size={batch_size} is not divisible by the {n} devices of the mesh; "
            f"use a multiple of {n} (e.g. {max(n, batch_size // n * n)})")
    return batch_size


def local_batch_size(batch_size: int, mesh: Mesh) -> int:
    """Rows of the global batch this process supplies."""
    rows = process_rows(batch_size, mesh)
    return rows.stop - rows.start


def process_rows(batch_size: int, mesh: Mesh) -> slice:
    """The rows ``[start, stop)`` of a global batch of ``batch_size`` that this process's
    devices hold under :func:`batch_sharding` (all of them with one process).

    The processes' slices are disjoint and together cover ``range(batch_size)``: every
    example of the global batch is made by exactly one process.

    Raises:
      UsageError: the batch does not split evenly over the mesh, or this process's devices
        do not hold one contiguous block of rows (a mesh whose device order interleaves
        the processes).
    """
    check_batch_size(batch_size, mesh)
    starts = sorted((index[0].start or 0, index[0].stop or batch_size) for index in
                    batch_sharding(mesh).addressable_devices_indices_map(
                        (batch_size,)).values())
    if not starts:
        raise UsageError(f"process {jax.process_index()} has no device in the mesh")
    if any(a[1] != b[0] for a, b in zip(starts[:-1], starts[1:], strict=True)):
        raise UsageError(f"process {jax.process_index()}'s devices hold rows {starts} of the "
                         "batch, not one block: order the mesh's devices by process")
    return slice(starts[0][0], starts[-1][1])


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows (:func:`process_rows`) -> global arrays sharded along the batch
    axis (the global batch has ``rows * process_count`` rows)."""
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


def host_copy(tree: Any) -> Any:
    """This process's NumPy copy of a replicated pytree (a global array of several processes
    cannot be fetched whole, but each process holds all of a replicated one)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))
                        if isinstance(x, jax.Array) else x, tree)


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


#: Overrides :func:`one_step_in_flight`: ``1`` waits for each step, ``0`` never does.
ONE_STEP_ENV = "TGD_ONE_STEP_IN_FLIGHT"


def one_step_in_flight(mesh: Mesh) -> bool:
    """Whether the training loop waits for each step before dispatching the next.

    jaxlib 0.10's in-process CPU all-reduce can deadlock (XLA aborts after its termination
    timeout) when several multi-device programs are in flight at once; with one at a time
    it did not (``python -m benchmarks.rendezvous``: 5 of 6 idle trials with up to 50 steps
    in flight, 0 of 3 with one; none with jaxlib 0.12). So on a CPU mesh of several devices
    with jaxlib older than 0.12 the loop keeps one step in flight; elsewhere the steps
    queue up as JAX dispatches them (waiting there cost jax 0.12 steps/s:
    benchmarks/RESULTS.md). ``$TGD_ONE_STEP_IN_FLIGHT`` (``1`` or ``0``) overrides.
    """
    forced = os.environ.get(ONE_STEP_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise UsageError(f"${ONE_STEP_ENV}={forced!r}: use 1 (wait for each step) or 0")
        return forced == "1"
    cpu_mesh = mesh.devices.size > 1 and all(d.platform == "cpu" for d in mesh.devices.flat)
    return cpu_mesh and _jaxlib_version() < (0, 12)


def _jaxlib_version() -> tuple[int, ...]:
    import jaxlib

    return tuple(int(p) for p in re.findall(r"\d+", jaxlib.__version__)[:2])


def multi_process() -> bool:
    """Whether this run spans several processes (after :func:`init_distributed`)."""
    return jax.process_count() > 1


def barrier(name: str, timeout_s: float = 3600) -> None:
    """Waits until every process of the run has called ``barrier(name)`` (nothing with one
    process). The coordination service's barrier, not a device collective: it holds however
    long the others take (up to ``timeout_s``), and fails as soon as one of them is known to
    be dead (its heartbeats stop). ``name`` must be new each time, the same on every process.
    """
    if not multi_process():
        return
    import orbax.checkpoint as ocp  # its handle on JAX's distributed client

    ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))


def gather_from_processes(value: int) -> list[int]:
    """Every process's ``value``, in process order (``[value]`` with one process).

    A collective: every process calls it at the same point. Used where the processes must
    agree on what they saw of a shared folder (a checkpoint one of them finds damaged).
    """
    if not multi_process():
        return [int(value)]
    from jax.experimental import multihost_utils

    return [int(v) for v in np.asarray(
        multihost_utils.process_allgather(np.asarray(value, np.int32)))]


def broadcast_from_first(values: list[int]) -> list[int]:
    """Process 0's ``values`` on every process (``values`` itself with one process).

    A collective; every process passes a list of the same length (its own values are
    ignored). What process 0 decided about a shared folder, so that no process acts on a
    listing of its own (a stale network-file-system cache may differ).
    """
    if not multi_process():
        return [int(v) for v in values]
    from jax.experimental import multihost_utils

    return [int(v) for v in np.asarray(
        multihost_utils.broadcast_one_to_all(np.asarray(values, np.int32)))]


#: What a process meets when ANOTHER process of its run stops: a collective or a barrier
#: of the coordination service failing (JAX raises its runtime error for both; sockets
#: closed under gloo, timeouts). Anything else raised in a process is its own.
COLLECTIVE_FAILURES: tuple[type[BaseException], ...] = (
    jax.errors.JaxRuntimeError, ConnectionError, TimeoutError)


def check_coordinator_port(coordinator_address: str) -> None:
    """For process 0, which serves ``coordinator_address``: its port must be free here.

    JAX's coordination service otherwise fails to bind while the other processes wait for
    it until their initialisation timeout; this says so at once.

    Raises:
      UsageError: naming the port in use.
    """
    port = int(coordinator_address.rsplit(":", 1)[1])
    try:  # every address, IPv6 and IPv4 alike, as the service binds
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:  # IPv6 off in this kernel
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds
        try:
            s.bind(("", port))
        except OSError as e:
            raise UsageError(
                f"--coordinator_address={coordinator_address}: port {port} is in use on "
                f"this machine, where process 0 serves the coordinator ({e.strerror}); "
                "choose a free port for every process") from None


def free_port() -> int:
    """A TCP port that was free on this machine a moment ago (for a local coordinator).

    Another program may take it before the coordinator binds it; process 0 then stops at
    once with a :class:`UsageError` naming the port (:func:`check_coordinator_port`), and a
    launcher retries with a new one (``tests/test_multiprocess.py``'s ``Launch``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


#: Environment variable: seconds after which a silent process counts as dead (default
#: :data:`HEARTBEAT_TIMEOUT_S`).
HEARTBEAT_TIMEOUT_ENV = "TGD_HEARTBEAT_TIMEOUT_S"
#: A process that stops sending heartbeats this long is dead, and the others' barriers fail.
#: JAX's default is 100 s; a killed process is usually noticed at once anyway (its peers'
#: sockets close under a collective), this bounds the wait in a checkpoint's barrier.
HEARTBEAT_TIMEOUT_S = 30


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, auto: bool = False,
                     initialization_timeout_s: int = 300,
                     heartbeat_timeout_s: int | None = None) -> bool:
    """Joins a multi-process run (``jax.distributed.initialize``) before JAX starts.

    Nothing happens (False) when no argument is given and ``auto`` is off: a plain
    single-process run. Given arguments are passed on; absent ones, and all of them with
    ``auto`` (``--config.distributed``), are left to JAX's own detection (SLURM, TPU pods,
    Kubernetes, Open MPI). CPU devices of different processes talk through gloo (JAX's
    in-process CPU collectives do not cross processes); GPUs and TPUs keep their own.
    Call before any JAX array exists, and after :func:`use_cpu_cores` (which then sets the
    devices of each process).

    Args:
      coordinator_address: ``HOST:PORT`` of process 0's coordination service.
      num_processes: how many processes take part.
      process_id: this one's index.
      auto: join even with no argument (JAX's cluster detection).
      initialization_timeout_s: how long to wait for every process to join.
      heartbeat_timeout_s: a process silent this long counts as dead (None:
        ``$TGD_HEARTBEAT_TIMEOUT_S``, else :data:`HEARTBEAT_TIMEOUT_S`).

    Returns:
      True once this process is part of the run (``jax.process_count()`` processes).

    Raises:
      UsageError: an argument is malformed, or JAX cannot tell the process count or index
        (not given, and no cluster environment to detect them from).
    """
    if coordinator_address is None and num_processes is None and process_id is None \
            and not auto:
        return False
    if coordinator_address is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d+",
                                                            coordinator_address):
        raise UsageError(f"--coordinator_address must be HOST:PORT, got "
                         f"{coordinator_address!r}")
    if num_processes is not None and num_processes < 1:
        raise UsageError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and (process_id < 0 or (num_processes is not None
                                                      and process_id >= num_processes)):
        raise UsageError(f"--process_id must be in [0, num_processes), got {process_id}")
    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = int(os.environ.get(HEARTBEAT_TIMEOUT_ENV, "")
                                  or HEARTBEAT_TIMEOUT_S)
    if coordinator_address is not None and process_id == 0:
        check_coordinator_port(coordinator_address)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    try:
        jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None},
                                   initialization_timeout=initialization_timeout_s,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
    except ValueError as e:  # JAX's "Number of processes must be defined" and the like
        raise UsageError(
            f"cannot start the multi-process run ({e}); give --coordinator_address=HOST:PORT, "
            "--num_processes=N and --process_id=I, or run under SLURM, a TPU pod or "
            "Kubernetes, where JAX finds them itself") from None
    # Every process makes its backend now: the CPU backend's gloo context waits for all of
    # them, and a process that computes nothing itself (evaluate.py's others) would not.
    jax.devices()
    return True
