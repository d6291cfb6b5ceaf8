"""What the command-line entry points share: flags, error reporting, progress logging."""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import flags, logging

from tgd_jax.train import config as config_lib
from tgd_jax.train import errors, parallel

__all__ = ["CONFIGS", "run", "apply_shortcuts", "progress", "workdir_flag", "start",
           "quiet_start", "reported", "parse_flags"]

quiet_start = parallel.quiet_start


def start() -> None:
    """First line of every command's ``main``: quiet backend probing, and the persistent
    compilation cache (``$TGD_COMPILATION_CACHE``; ``off`` disables it)."""
    parallel.quiet_start()
    parallel.use_compilation_cache()

#: The ``configs/`` folder next to the package (a source checkout).
CONFIGS = Path(__file__).resolve().parents[2] / "configs"

def apply_shortcuts(config: ml_collections.ConfigDict, **values: Any) -> None:
    """Copies shortcut flags (``--method`` -> ``config.method``) that were given."""
    config_lib.override(config, **values)


_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "JAX devices to split a CPU-only machine into, for data "
    "parallelism over its cores: 0 = one per core (the largest count that divides the "
    "batch); default $TGD_CPU_DEVICES, else 1 (see tgd_jax.train.parallel.use_cpu_cores for why "
    "it is opt-in). Ignored on GPU/TPU.")


_VERBOSE = flags.DEFINE_bool(
    "verbose", False, f"On an error, show the traceback instead of one line (also "
    f"${errors.VERBOSE_ENV}=1).")


def reported(name: str) -> contextlib.AbstractContextManager[None]:
    """One line ``<name>: error: ...`` and exit code 2 (usage) or 1 (failure) for every
    expected error in the block (:mod:`tgd_jax.train.errors`)."""
    return errors.reported(name, verbose=_VERBOSE.value)


def parse_flags(argv: list[str]) -> list[str]:
    """``app.run(main, flags_parser=cli.parse_flags)``: a bad flag, including an unknown or
    mistyped ``--config.<field>``, is one line on stderr and exit code 2."""
    return errors.parse_flags(argv)


def run(name: str, fn: Callable[..., dict[str, Any]], config: ml_collections.ConfigDict,
        workdir: str) -> None:
    """Runs an experiment function; expected errors end the program with one clear line."""
    with reported(name):
        parallel.use_cpu_cores(int(config.batch_size), _CPU_DEVICES.value)
        quiet_libraries()
        if config.get("distributed"):
            jax.distributed.initialize()
        summary = fn(config, workdir, log=progress)
    progress(f"{name} finished: " + ", ".join(
        f"{k}={summary[k]}" for k in sorted(summary) if not isinstance(summary[k], list | dict)))


def progress(message: str) -> None:
    """One timestamped progress line on stdout (flushed, so it shows in pipes and logs)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def quiet_libraries() -> None:
    """Orbax reports every file it writes at INFO; keep the run's own lines readable. Its
    errors are raised to the command too, which reports each as one line, so orbax's own
    ERROR records (with tracebacks, from its background threads) are dropped."""
    logging.set_verbosity(logging.WARNING)
    absl_logger = std_logging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxErrors) for f in absl_logger.filters):
        absl_logger.addFilter(_DropOrbaxErrors())


class _DropOrbaxErrors(std_logging.Filter):
    """Drops ERROR (and worse) records logged from orbax's modules."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not (record.levelno >= std_logging.ERROR
                    and f"{os.sep}orbax{os.sep}" in record.pathname)


def workdir_flag() -> flags.FlagHolder[str]:
    return flags.DEFINE_string(
        "workdir", None, "Folder for everything the run writes: config.json, versions.json, "
        "metrics.jsonl, checkpoints/, best/, summary.json. Rerunning the same command on "
        "the same workdir resumes from its newest checkpoint.", required=True)
