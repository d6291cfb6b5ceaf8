"""Results the simulator derives from its fixed geometry alone, kept on disk across processes.

Every simulator process calibrates its count scale on the same reference study (a phantom,
its projection and expected data: seconds, most of them compiling); :func:`disk_cached` keeps
such a function's NumPy result in ``$TGD_SIM_CACHE`` (default ``~/.cache/tgd_jax/sim``;
``off`` turns it off), from which the next process reads it in a millisecond. (The system
matrices are not kept: about 100 MB each, rebuilt in about a second.)

A cached result is the very array the function returned (bit for bit), found under a key
that covers the function, its arguments, the simulator's source code as it is on disk at the
call and the versions of NumPy, JAX and jaxlib; a function computed with XLA
(``device=True``) is also keyed by what may change its floating-point results: the
backend, the device kind and platform version, the host CPU's model and instruction sets,
``$XLA_FLAGS`` and the JAX options that change programs or random draws. A file that cannot be
read back whole is rebuilt and replaced; a folder that cannot be written is not used.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import jax
import jaxlib
import numpy as np

from tgd_jax.io import startup
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
    folder = startup.cache_folder(os.environ.get(SIM_CACHE_ENV, SIM_CACHE))
    return None if folder is None else Path(folder)


def _source_digest() -> str:
    """The simulator's code as it is now (not cached: a session may edit and reload it)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


#: JAX options that change what a program computes (its precision, its random draws).
_JAX_OPTIONS = ("jax_disable_most_optimizations", "jax_enable_x64",
                "jax_threefry_partitionable", "jax_default_matmul_precision")


def _jax_option(name: str) -> str:
    try:
        return repr(jax.config.read(name))
    except AttributeError:  # some options are read as attributes only
        return repr(getattr(jax.config, name, None))


@functools.cache
def _host_cpu() -> str:
    """The host CPU's model and instruction sets: XLA:CPU compiles for them."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _key(fn: Callable, name: str, args: tuple, device: bool) -> str:
    parts = [name, fn.__module__, fn.__qualname__, repr(args), _source_digest(),
             np.__version__, jax.__version__, jaxlib.__version__, platform.machine()]
    if device:  # what may change XLA's floating-point results
        first = jax.devices()[0]
        parts += [jax.default_backend(), first.device_kind, first.client.platform_version,
                  _host_cpu(), os.environ.get("XLA_FLAGS", ""),
                  *(_jax_option(option) for option in _JAX_OPTIONS)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _read(path: Path) -> Arrays | None:
    """The arrays stored at ``path``, or None if it is missing or not whole."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            names = sorted(stored.files, key=lambda n: (len(n), n))
            if not names or names != [f"a{i}" for i in range(len(names))]:
                return None
            return tuple(stored[n] for n in names)
    except Exception:  # noqa: BLE001 - any damage (zip, npy, a member's name) means rebuild
        return None


def disk_cached(name: str, *, device: bool = False) -> Callable[[F], F]:
    """Keeps ``fn(*args)`` (a tuple of NumPy arrays; ``args`` hashable and fully described by
    their ``repr``: numbers, strings, frozen dataclasses) on disk under ``name``.

    ``device``: the function computes with XLA (its result depends on the backend)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def cached(*args):
            folder = cache_folder()
            if folder is None:
                return tuple(np.asarray(a) for a in fn(*args))
            path = folder / f"{name}-{_key(fn, name, args, device)}.npz"
            stored = _read(path)
            if stored is not None:
                return stored
            arrays = tuple(np.asarray(a) for a in fn(*args))
            try:
                with workdir_lib.atomic_path(path, suffix=".npz") as tmp:
                    np.savez(tmp, **{f"a{i}": a for i, a in enumerate(arrays)})
            except OSError:
                pass  # a full or read-only disk costs the next process the build, no more
            return arrays

        return cached  # type: ignore[return-value]

    return wrap
