"""What every run writes into its workdir: atomic JSON, JSONL metrics, versions, figures, and
the lock that keeps a second command out of a folder in use."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import ml_collections

from tgd_jax.io.errors import RunError, UsageError

__all__ = ["atomic_path", "atomic_write_bytes", "write_json", "append_jsonl", "versions",
           "save_figure", "prepare_workdir", "config_diff", "check_writable",
           "check_output_file", "output_folder", "FolderLock", "FolderInUseError",
           "lock_folder", "LOCK_FILE", "release_all_locks"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp", *,
                make_parent: bool = True) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; renames it to ``path`` if the block succeeds.

    Whatever writes the file (h5py, nibabel, plain bytes) writes the temporary path; an
    exception or a kill leaves either the old file or none under ``path``, never a
    half-written one (the temporary file is removed on an exception). ``suffix`` keeps an
    extension writers need (``.nii.gz``).

    ``make_parent=False``: the folder must exist (it was checked before the run, so a
    missing one vanished during it); :class:`RunError` instead of creating a new one that
    would hold only part of the run's outputs.
    """
    path = Path(path)
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise RunError(f"{path.parent}: the output folder vanished during the run; "
                       f"{path.name} was not written")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _default_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open(path, "w")`` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *,
                       make_parent: bool = True) -> Path:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_path`), fsynced."""
    with atomic_path(path, make_parent=make_parent) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any, *, make_parent: bool = True) -> Path:
    """Atomic, indented JSON (numpy/JAX scalars and arrays are converted)."""
    return atomic_write_bytes(path, (json.dumps(_plain(obj), indent=2) + "\n").encode(),
                              make_parent=make_parent)


def append_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Appends one JSON line (a metrics record), flushed so progress survives a kill.

    Raises:
      RunError: the write failed (a full disk, a file-size limit), naming the file; a line
        cut short is dropped by the next resume (:func:`tgd_jax.train.metrics.read_metrics`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(_plain(dict(record))) + "\n")
            f.flush()
    except OSError as error:
        raise RunError(f"{path}: appending a record failed ({error.strerror or error}); the "
                       "checkpoints hold the run, rerun the same command to resume"
                       ) from error


def versions() -> dict[str, Any]:
    """Python, platform, devices and the versions of the packages a result depends on."""
    out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in ("tgd-jax", "jax", "jaxlib", "flax", "optax", "numpy", "h5py",
                    "orbax-checkpoint", "ml-collections"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    import jax

    out["devices"] = [str(d) for d in jax.devices()]
    out["device_count"] = jax.device_count()  # CPU: parallel.use_cpu_cores (--cpu_devices)
    out["compilation_cache"] = jax.config.jax_compilation_cache_dir  # None: off
    return out


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120, *,
                make_parent: bool = True) -> Path:
    """Saves a matplotlib figure atomically (PNG) and closes it."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue(), make_parent=make_parent)


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> str | None:
    """The first differing key of two nested config dicts, as ``'a.b: old -> new'``."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found = config_diff(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif _jsonable(a) != _jsonable(b):
            return f"{prefix}{key}: {a!r} -> {b!r}"
    return None


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def prepare_workdir(workdir: str | Path, config: ml_collections.ConfigDict,
                    command: str, log: Callable[[str], None] = print, *,
                    added_fields: Mapping[str, Any] | None = None) -> Path:
    """Creates and locks ``workdir``, and writes ``config.json`` and ``versions.json``.

    The lock (:func:`lock_folder`) refuses a workdir another live run holds, before anything
    is written; :func:`tgd_jax.train.trainer.fit` releases it when training ends (else the
    process's exit does). A workdir whose checkpoints (``checkpoints/`` or ``best/``) come
    from a DIFFERENT config, or from an unknown one (no readable ``config.json``), is
    refused: they would be resumed into, or reported as the best of, the wrong experiment.
    The same config resumes. A workdir without checkpoints (a run that failed before its
    first one) is reused.

    ``added_fields`` (dotted name -> value): config fields added after a workdir may have
    been written, with the value that behaves as the code did before them. A saved config
    that lacks such a field is read as holding that value, so a run written before the
    field existed still resumes when the field is left at it.
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"{workdir}: exists and is not a folder; choose another --workdir")
    new = {"command": command, "config": config.to_dict()}
    if jax.process_index() != 0:  # the same refusal everywhere; only the first one writes
        _check_config(workdir, new, added_fields or {})
        return workdir
    lock = lock_folder(workdir, command, log=log)
    try:
        _check_config(workdir, new, added_fields or {})
        write_json(workdir / "config.json", new)
        write_json(workdir / "versions.json", versions())
    except BaseException:
        lock.release()
        raise
    return workdir


def _check_config(workdir: Path, new: Mapping[str, Any],
                  added_fields: Mapping[str, Any]) -> None:
    """Refuses a workdir whose checkpoints come from another config than ``new``."""
    saved = workdir / "config.json"
    has_checkpoints = any(p.name.isdigit() for kind in ("checkpoints", "best")
                          for p in (workdir / kind).glob("*"))
    if has_checkpoints:
        try:
            old = json.loads(saved.read_text())
        except (OSError, ValueError):
            raise UsageError(f"{workdir} holds checkpoints but no readable config.json, so "
                             "their run is unknown; use a new --workdir, or delete it to "
                             "start over") from None
        old = _jsonable(old)
        for name, value in added_fields.items():  # written before the field existed
            *parents, leaf = name.split(".")
            node = old.get("config") if isinstance(old, dict) else None
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and leaf not in node:
                node[leaf] = _jsonable(value)
        diff = config_diff(old, _jsonable(new))
        if diff:
            raise UsageError(f"{workdir} holds a run with a different config ({diff}); "
                             "use a new --workdir, or delete it to start over")


#: The lock file of a folder in use (a workdir, a reproduction's output folder).
LOCK_FILE = "run.lock"
_HELD: dict[str, FolderLock] = {}


class FolderInUseError(UsageError):
    """Another live run holds the folder (the message names its pid and host)."""


@dataclasses.dataclass
class FolderLock:
    """This process's hold on a folder (see :func:`lock_folder`); a context manager."""

    folder: Path
    path: Path
    fd: int

    def check(self) -> None:
        """Raises :class:`RunError` if the folder or its lock file was removed or replaced
        (the run would otherwise recreate it and write a partial run into it)."""
        if not _same_file(self.path, self.fd):
            raise RunError(f"{self.folder}: removed or replaced during the run ({LOCK_FILE} "
                           "is gone); stopped without writing more into it")

    def release(self) -> None:
        """Removes the lock file (if still ours) and drops the lock. Idempotent."""
        if _HELD.get(str(self.folder)) is self:
            del _HELD[str(self.folder)]
        if self.fd < 0:
            return
        if _same_file(self.path, self.fd):
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self.fd)  # drops the flock
        self.fd = -1

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_folder(folder: str | os.PathLike[str], command: str, *,
                log: Callable[[str], None] = print) -> FolderLock:
    """Creates ``folder`` if needed and takes its lock, ``<folder>/run.lock``.

    The lock is an exclusive ``flock`` on that file, which holds this process's pid, host,
    command and start time. The kernel drops a flock when its process dies, however it dies
    (SIGKILL included), so a lock file left by a dead run is taken over (with a line in
    ``log``). On a file system without ``flock`` a holder on this host counts as alive while
    its pid runs. The lock is re-entrant within one process; :meth:`FolderLock.release`, or
    the process's exit, releases it.

    Raises:
      FolderInUseError: if a live run holds the folder (naming its pid and host), or a run
        on another host left the file (this host cannot tell whether it still runs).
      UsageError: if the folder cannot be created or written.
    """
    folder = check_writable(folder)
    key = os.path.realpath(folder)
    if key in _HELD:
        return _HELD[key]
    path = folder / LOCK_FILE
    for _ in range(100):  # retried only while releasing holders remove the file under us
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderInUseError(_in_use(folder, holder)) from None
        except OSError:  # no flock on this file system: the pid check alone decides
            flocked = False
        if _same_file(path, fd):
            break
        os.close(fd)
    else:
        raise RunError(f"{path}: could not take the lock (the file keeps being replaced)")
    holder = _holder(fd)
    if holder and (holder.get("host") != socket.gethostname()
                   or (not flocked and _alive(holder))):
        os.close(fd)
        raise FolderInUseError(_in_use(folder, holder, path))
    if holder:
        log(f"{folder}: took over {LOCK_FILE} of a run that ended without releasing it "
            f"({holder.get('command')}, pid {holder.get('pid')} on {holder.get('host')})")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "proc_start": _proc_start(os.getpid())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)
    lock = _HELD[key] = FolderLock(Path(key), Path(key) / LOCK_FILE, fd)
    return lock


def _in_use(folder: Path, holder: Mapping[str, Any], path: Path | None = None) -> str:
    what = (f"{holder.get('command', 'another run')} (pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, since {holder.get('started', '?')})")
    if path is not None and holder.get("host") != socket.gethostname():
        return (f"{folder} is in use by {what}, which this host cannot check; if that run "
                f"has ended, delete {path}")
    return f"{folder} is in use by {what}; wait for it to end, or choose another folder"


def _holder(fd: int) -> dict[str, Any]:
    """The record in a lock file ({} if empty or unreadable: a holder that died writing)."""
    try:
        record = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _alive(holder: Mapping[str, Any]) -> bool:
    """Whether the holder's pid runs on this host, and is the same process (start time)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    started = holder.get("proc_start")
    return started is None or _proc_start(pid) in (None, started)


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _same_file(path: Path, fd: int) -> bool:
    try:
        a, b = os.stat(path), os.fstat(fd)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF):
            return False
        raise
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@atexit.register
def release_all_locks() -> None:
    """Releases every folder lock this process holds (at exit, or before leaving at once)."""
    for lock in list(_HELD.values()):
        lock.release()


def check_writable(folder: str | os.PathLike[str]) -> Path:
    """Creates ``folder`` if needed and checks that files can be created in it.

    Raises:
      UsageError: naming the folder, if it is a file or not writable (before any work).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"{folder}: a file is in the way of this output folder") from None
    except OSError as e:
        raise UsageError(f"{folder}: cannot write here ({e.strerror})") from None
    return folder


@contextlib.contextmanager
def output_folder(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """:func:`check_writable` for the block; if the block raises (a refusal of a later input,
    say), the folders this call created are removed again while still empty, so a command
    that refuses leaves nothing behind."""
    folder = Path(folder)
    created: list[Path] = []  # deepest first
    probe = folder.absolute()
    while not os.path.lexists(probe) and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    check_writable(folder)
    try:
        yield folder
    except BaseException:
        for path in created:
            try:
                path.rmdir()
            except OSError:  # not empty: something was written, keep it
                break
        raise


def check_output_file(path: str | os.PathLike[str], *,
                      inputs: Sequence[str | os.PathLike[str]] = (),
                      overwrite: bool = False) -> Path:
    """Checks, before any work, that ``path`` can be written without losing anything.

    Raises:
      UsageError: if ``path`` is one of ``inputs``, is a folder, already exists (unless
        ``overwrite``), or its folder is not writable.
    """
    path = Path(path)
    for source in inputs:
        source = Path(source)
        if source.exists() and path.exists() and os.path.samefile(source, path):
            raise UsageError(f"{path}: the output would replace the input; choose another "
                             "output path")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; give a file name for the output")
    if path.exists() and not overwrite:
        raise UsageError(f"{path}: exists; choose another output path, or pass --overwrite "
                         "to replace it")
    check_writable(path.parent)
    return path


def _plain(obj: Any) -> Any:
    """Converts numpy/JAX values and containers to JSON-native types (NaN/inf -> null)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / JAX arrays and scalars
        return _plain(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # standard JSON has no NaN or Infinity
    return obj
