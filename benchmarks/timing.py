"""Timing helpers: rounds after warm-up, min and median, and the machine's description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any


def time_rounds(fn: Callable[[], Any], *, rounds: int = 5, number: int = 1,
                warmup: int = 2) -> dict[str, float]:
    """Seconds per call of ``fn`` (which must block until its result is ready).

    ``warmup`` untimed calls, then ``rounds`` rounds of ``number`` calls each.
    """
    for _ in range(warmup):
        fn()
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        per_call.append((time.perf_counter() - start) / number)
    return {"min_s": min(per_call), "median_s": statistics.median(per_call),
            "rounds": rounds, "number": number}


def time_interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int = 5, number: int = 1,
                     warmup: int = 2) -> dict[str, dict[str, float]]:
    """:func:`time_rounds` of several functions with their rounds interleaved (A B C A B C
    ...), so that a slow spell of the machine hits all of them alike; for small ratios."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(number):
                fn()
            per_call[name].append((time.perf_counter() - start) / number)
    return {name: {"min_s": min(v), "median_s": statistics.median(v), "rounds": rounds,
                   "number": number} for name, v in per_call.items()}


def machine() -> dict[str, Any]:
    """CPU model, core count, Python and package versions, JAX devices."""
    import jax

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "scikit-learn",
                    "scikit-image"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": jax.default_backend(), "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "versions": versions}
