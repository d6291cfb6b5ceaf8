"""What the command-line entry points share: flags, error reporting, progress logging."""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import flags, logging

from tgd_jax.io import errors, startup
from tgd_jax.io import workdir as workdir_lib
from tgd_jax.pet import config as config_lib
from tgd_jax.train import parallel

__all__ = ["CONFIGS", "run", "apply_shortcuts", "progress", "workdir_flag", "start",
           "quiet_start", "reported", "parse_flags", "join_processes", "main_process",
           "every_process_works"]

quiet_start = startup.quiet_start


def start() -> None:
    """First line of every command's ``main``: quiet backend probing, and the persistent
    compilation cache (``$TGD_COMPILATION_CACHE``; ``off`` disables it)."""
    startup.quiet_start()
    startup.use_compilation_cache()

#: The commands' default configs, inside the package (so installed commands have them).
CONFIGS = Path(__file__).resolve().parent / "configs"

def apply_shortcuts(config: ml_collections.ConfigDict, **values: Any) -> None:
    """Copies shortcut flags (``--method`` -> ``config.method``) that were given."""
    config_lib.override(config, **values)


_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Training commands on a CPU-only machine: JAX devices to split "
    "the CPU into, for data parallelism over its cores: 0 = one per core this process may "
    "use (the largest count that divides the batch). Default $TGD_CPU_DEVICES, else 0 "
    "alone and 1 per process in a multi-process run. Ignored on GPU/TPU and by the "
    "inference commands.")


_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process run: HOST:PORT where process 0 listens (the "
    "same for every process), with --num_processes and --process_id. Absent (and with "
    "--config.distributed=True), JAX detects the run itself on SLURM, TPU pods and "
    "Kubernetes. See docs/scaling.md.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-process run: how many processes take part (each with "
    "--cpu_devices devices on a CPU).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-process run: this process's index, 0 .. num_processes - 1; "
    "process 0 writes the files.")


_VERBOSE = flags.DEFINE_bool(
    "verbose", False, f"On an error, show the traceback instead of one line (also "
    f"${errors.VERBOSE_ENV}=1).")


def reported(name: str) -> contextlib.AbstractContextManager[None]:
    """One line ``<name>: error: ...`` and exit code 2 (usage) or 1 (failure) for every
    expected error in the block (:mod:`tgd_jax.io.errors`)."""
    return errors.reported(name, verbose=_VERBOSE.value)


def parse_flags(argv: list[str]) -> list[str]:
    """``app.run(main, flags_parser=cli.parse_flags)``: a bad flag, including an unknown or
    mistyped ``--config.<field>``, is one line on stderr and exit code 2.

    ``--config=configs/<name>.py[:preset]`` where no such file exists (outside a
    checkout) loads the package's own config of that name, so the same command line
    works in a checkout, from an installed package and from any folder."""
    return errors.parse_flags([_package_config(a) for a in argv])


def _package_config(arg: str) -> str:
    if not arg.startswith("--config="):
        return arg
    path, colon, preset = arg[len("--config="):].partition(":")
    # only configs/<name>: a mistyped path of one's own must not load ours
    if (not path or Path(path).exists() or Path(path).parent != Path("configs")
            or not (CONFIGS / Path(path).name).is_file()):
        return arg
    return f"--config={CONFIGS / Path(path).name}{colon}{preset}"


def join_processes(auto: bool = False) -> bool:
    """Joins the multi-process run the flags (or, with ``auto``, the cluster) describe, before
    any JAX work; returns whether this run has several processes. From then on an error
    ends this process at once after its one line (:func:`errors.leave_at_once_on_error`),
    so it never waits at shutdown for processes that are gone."""
    parallel.init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                              auto=auto)
    if not parallel.multi_process():
        return False
    errors.leave_at_once_on_error(workdir_lib.release_all_locks)
    return True


def main_process() -> bool:
    """Whether this process writes the files and the progress lines (process 0)."""
    return jax.process_index() == 0


@contextlib.contextmanager
def every_process_works() -> Iterator[Path | None]:
    """For a command whose work is not data parallel (``evaluate.py``, ``denoise.py``,
    ``threshold.py``): joins the run the launch flags describe, like the training commands,
    so one launcher line serves every command.

    Every process then does the same work: in a multi-process run orbax reads checkpoints
    collectively, so process 0 cannot read one alone. Yields None on process 0 (or alone),
    which writes the real outputs, and on the others a scratch folder for their copies
    (removed at the end).
    """
    join_processes()
    if main_process():
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="tgd-process-") as scratch:
        yield Path(scratch)


def run(name: str, fn: Callable[..., dict[str, Any]], config: ml_collections.ConfigDict,
        workdir: str) -> None:
    """Runs an experiment function; expected errors end the program with one clear line.

    Multi-process (:func:`join_processes`): every process runs ``fn``; process 0 alone
    prints progress."""
    with reported(name):
        if not workdir.strip():  # '' would write the run into the current folder
            raise errors.UsageError("--workdir is empty; name the folder the run writes into")
        auto = bool(config.get("distributed"))
        # Every core for a single process; one device per process in a multi-process run
        # (each would otherwise size its split from the global batch and its own cores).
        several = auto or any(v is not None for v in (
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value))
        parallel.use_cpu_cores(int(config.batch_size), _CPU_DEVICES.value,
                               default=1 if several else 0)
        quiet_libraries()
        join_processes(auto=auto)
        log = progress if main_process() else _silent
        summary = fn(config, workdir, log=log)
    log(f"{name} finished: " + ", ".join(
        f"{k}={summary[k]}" for k in sorted(summary) if not isinstance(summary[k], list | dict)))


def _silent(message: str) -> None:
    del message


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
