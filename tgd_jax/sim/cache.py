"""Results the simulator derives from its fixed geometry alone, kept on disk across processes.

Every simulator process calibrates its count scale on the same reference study (a phantom,
its projection and expected data: seconds, most of them compiling); :func:`disk_cached` keeps
such a function's NumPy result in ``$TGD_SIM_CACHE`` (default ``~/.cache/tgd_jax/sim``;
``off`` turns it off), from which the next process reads it in a millisecond. (The system
matrices are not kept: about 100 MB each, rebuilt in about a second.)

A cached result is the very array the function returned (bit for bit), found under a key
that covers the function, its arguments, the simulator's source code and the versions of
NumPy and JAX; a function computed with XLA (``device=True``) is also keyed by the backend,
the device kind and the compile options, whose floating-point results may differ. A file that
cannot be read is rebuilt and replaced; a folder that cannot be written is skipped.
"""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import jax
import numpy as np

from tgd_jax.io import workdir as workdir_lib

__all__ = ["disk_cached", "cache_folder", "SIM_CACHE", "SIM_CACHE_ENV"]

#: Where the simulator keeps what it caches, unless ``$TGD_SIM_CACHE`` says otherwise (a
#: folder, or ``off``).
SIM_CACHE = "~/.cache/tgd_jax/sim"
#: The environment variable naming the folder (``off``, ``0`` or empty: no cache).
SIM_CACHE_ENV = "TGD_SIM_CACHE"

Arrays = tuple[np.ndarray, ...]
F = TypeVar("F", bound=Callable[..., Arrays])


def cache_folder() -> Path | None:
    """The cache folder (created), or None when it is off or cannot be written."""
    path = os.environ.get(SIM_CACHE_ENV, SIM_CACHE)
    if not path or path.strip().lower() in ("0", "off", "none", "false"):
        return None
    folder = Path(os.path.expanduser(path))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK | os.X_OK) else None


@functools.cache
def _source_digest() -> str:
    """The simulator's code: a change to any of its modules is a new key."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _key(name: str, args: tuple, device: bool) -> str:
    parts = [name, repr(args), _source_digest(), np.__version__, jax.__version__]
    if device:  # XLA's results may differ with the backend, the device and the options
        parts += [jax.default_backend(), jax.devices()[0].device_kind,
                  repr(jax.config.read("jax_disable_most_optimizations")),
                  repr(jax.config.read("jax_enable_x64")), os.environ.get("XLA_FLAGS", "")]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def disk_cached(name: str, *, device: bool = False) -> Callable[[F], F]:
    """Keeps ``fn(*args)`` (a tuple of NumPy arrays; ``args`` hashable and fully described by
    their ``repr``: numbers, strings, frozen dataclasses) on disk under ``name``.

    ``device``: the function computes with XLA (its result depends on the backend)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def cached(*args):
            folder = cache_folder()
            if folder is None:
                return fn(*args)
            path = folder / f"{name}-{_key(name, args, device)}.npz"
            try:
                with np.load(path, allow_pickle=False) as stored:
                    return tuple(stored[f"a{i}"] for i in range(len(stored.files)))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                pass  # not there yet, or damaged: rebuilt and replaced below
            arrays = tuple(np.asarray(a) for a in fn(*args))
            try:
                with workdir_lib.atomic_path(path, suffix=".npz") as tmp:
                    np.savez(tmp, **{f"a{i}": a for i, a in enumerate(arrays)})
            except OSError:
                pass  # a full or read-only disk costs the next process the build, no more
            return arrays

        return cached  # type: ignore[return-value]

    return wrap
