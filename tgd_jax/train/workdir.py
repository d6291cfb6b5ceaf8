"""What every run writes into its workdir: atomic JSON, JSONL metrics, versions, figures."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import ml_collections

from tgd_jax.train.errors import UsageError

__all__ = ["atomic_path", "atomic_write_bytes", "write_json", "append_jsonl", "versions",
           "save_figure", "prepare_workdir", "config_diff", "check_writable",
           "check_output_file"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path next to ``path``; renames it to ``path`` if the block succeeds.

    Whatever writes the file (h5py, nibabel, plain bytes) writes the temporary path; an
    exception or a kill leaves either the old file or none under ``path``, never a
    half-written one (the temporary file is removed on an exception). ``suffix`` keeps an
    extension writers need (``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_path`), fsynced."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomic, indented JSON (numpy/JAX scalars and arrays are converted)."""
    return atomic_write_bytes(path, (json.dumps(_plain(obj), indent=2) + "\n").encode())


def append_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Appends one JSON line (a metrics record), flushed so progress survives a kill."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(_plain(dict(record))) + "\n")
        f.flush()


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


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Saves a matplotlib figure atomically (PNG) and closes it."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


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
                    command: str) -> Path:
    """Creates ``workdir`` and writes ``config.json`` and ``versions.json``.

    A workdir whose checkpoints (``checkpoints/`` or ``best/``) come from a DIFFERENT config,
    or from an unknown one (no readable ``config.json``), is refused: they would be resumed
    into, or reported as the best of, the wrong experiment. The same config resumes. A
    workdir without checkpoints (a run that failed before its first one) is reused.
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"{workdir}: exists and is not a folder; choose another --workdir")
    saved = workdir / "config.json"
    new = {"command": command, "config": config.to_dict()}
    has_checkpoints = any(p.name.isdigit() for kind in ("checkpoints", "best")
                          for p in (workdir / kind).glob("*"))
    if has_checkpoints:
        try:
            old = json.loads(saved.read_text())
        except (OSError, ValueError):
            raise UsageError(f"{workdir} holds checkpoints but no readable config.json, so "
                             "their run is unknown; use a new --workdir, or delete it to "
                             "start over") from None
        diff = config_diff(_jsonable(old), _jsonable(new))
        if diff:
            raise UsageError(f"{workdir} holds a run with a different config ({diff}); "
                             "use a new --workdir, or delete it to start over")
    if jax.process_index() == 0:
        check_writable(workdir)
        write_json(saved, new)
        write_json(workdir / "versions.json", versions())
    return workdir


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
