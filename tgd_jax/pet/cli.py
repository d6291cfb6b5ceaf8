"""What the command-line entry points share: flags, error reporting, progress logging."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import flags, logging

from tgd_jax.train import config as config_lib
from tgd_jax.train import parallel
from tgd_jax.train.checkpoints import CheckpointError
from tgd_jax.train.dataset import DatasetError
from tgd_jax.train.trainer import NonFiniteLossError

__all__ = ["CONFIGS", "run", "apply_shortcuts", "progress", "workdir_flag", "quiet_start"]

quiet_start = parallel.quiet_start

#: The ``configs/`` folder next to the package (a source checkout).
CONFIGS = Path(__file__).resolve().parent.parent / "configs"

_EXPECTED = (DatasetError, CheckpointError, NonFiniteLossError, ValueError, KeyError,
             FileNotFoundError, ImportError)


def apply_shortcuts(config: ml_collections.ConfigDict, **values: Any) -> None:
    """Copies shortcut flags (``--method`` -> ``config.method``) that were given."""
    config_lib.override(config, **values)


_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "JAX devices to split a CPU-only machine into, for data "
    "parallelism over its cores: 0 = one per core (the largest count that divides the "
    "batch); default $TGD_CPU_DEVICES, else 1 (see tgd_jax.train.parallel.use_cpu_cores for why "
    "it is opt-in). Ignored on GPU/TPU.")


def run(name: str, fn: Callable[..., dict[str, Any]], config: ml_collections.ConfigDict,
        workdir: str) -> None:
    """Runs an experiment function; expected errors end the program with one clear line."""
    try:
        parallel.use_cpu_cores(int(config.batch_size), _CPU_DEVICES.value)
    except ValueError as e:
        sys.exit(f"{name}: error: {e}")
    quiet_libraries()
    if config.get("distributed"):
        jax.distributed.initialize()
    try:
        summary = fn(config, workdir, log=progress)
    except _EXPECTED as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        sys.exit(f"{name}: error: {message}")
    progress(f"{name} finished: " + ", ".join(
        f"{k}={summary[k]}" for k in sorted(summary) if not isinstance(summary[k], list | dict)))


def progress(message: str) -> None:
    """One timestamped progress line on stdout (flushed, so it shows in pipes and logs)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def quiet_libraries() -> None:
    """Orbax reports every file it writes at INFO; keep the run's own lines readable."""
    logging.set_verbosity(logging.WARNING)


def workdir_flag() -> flags.FlagHolder[str]:
    return flags.DEFINE_string(
        "workdir", None, "Folder for everything the run writes: config.json, versions.json, "
        "metrics.jsonl, checkpoints/, best/, summary.json. Rerunning the same command on "
        "the same workdir resumes from its newest checkpoint.", required=True)
