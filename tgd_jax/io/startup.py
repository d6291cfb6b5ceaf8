"""What every command does first, before JAX picks its backend: a quiet log, and compiled
programs kept on disk across processes."""

from __future__ import annotations

import logging
import os

import jax

__all__ = ["quiet_start", "use_compilation_cache", "cache_folder", "COMPILATION_CACHE",
           "COMPILATION_CACHE_ENV"]


class _DropBackendProbe(logging.Filter):
    """Drops JAX's INFO line about each platform it probed and did not find ("Unable to
    initialize backend 'tpu'"): on a machine without a TPU it is not news. Warnings and
    errors from the same logger (a GPU present but unusable, say) still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO
                    and record.getMessage().startswith("Unable to initialize backend"))


def quiet_start() -> None:
    """Call first in every command's ``main``, before JAX picks its backend."""
    logger = logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _DropBackendProbe) for f in logger.filters):
        logger.addFilter(_DropBackendProbe())


#: Where compiled XLA programs persist across processes, unless ``$TGD_COMPILATION_CACHE``
#: says otherwise (a folder, or ``off``).
COMPILATION_CACHE = "~/.cache/tgd_jax/xla"
COMPILATION_CACHE_ENV = "TGD_COMPILATION_CACHE"


def cache_folder(setting: str) -> str | None:
    """The folder a cache setting names (``~`` expanded, created), or None when the setting
    is off (``off``, ``0``, ``none``, ``false`` or empty) or the folder cannot be written."""
    if not setting or setting.strip().lower() in ("0", "off", "none", "false"):
        return None
    folder = os.path.expanduser(setting)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK | os.X_OK) else None


def use_compilation_cache(path: str | None = None) -> str | None:
    """Keeps compiled programs on disk (JAX's persistent compilation cache) and returns the
    folder, or None when it is off or cannot be written.

    A command compiles the same train, eval and KSE programs every time it starts; with the
    cache the second process loads them instead (measured: ``benchmarks/RESULTS.md``). The
    cache key covers the program, the compile options, the jax version and the device, so a
    hit runs the very same executable: results are bit-identical (tested). Call before the
    first compilation.
    """
    if path is None:
        path = os.environ.get(COMPILATION_CACHE_ENV, COMPILATION_CACHE)
    folder = cache_folder(path)
    if folder is None:
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    # Every program, however quick to compile: KSE compiles one per layer shape in ~0.2 s.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
