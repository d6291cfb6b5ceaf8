"""Batches made ahead on a background thread while the devices compute."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Prefetcher"]


class Prefetcher:
    """Iterates ``place(make(step))`` for ``step`` in ``[start, stop)``, ``make`` running
    ``depth`` steps ahead.

    ``make`` runs on one background thread and must not touch JAX (NumPy sampling only);
    ``place`` (the host-to-device copy, default: none) runs on the consuming thread, so
    that only the thread that runs the steps uses the devices. An exception in ``make`` is
    re-raised in the consumer at the step that failed.
    """

    def __init__(self, make: Callable[[int], Any], start: int, stop: int, depth: int = 2,
                 place: Callable[[Any], Any] | None = None):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._count = max(0, stop - start)
        self._place = place
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, start, stop), daemon=True)
        self._thread.start()

    def _run(self, make: Callable[[int], Any], start: int, stop: int) -> None:
        for step in range(start, stop):
            try:
                item = (step, make(step), None)
            except BaseException as e:  # hand the error to the consumer
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[2] is not None:
                return

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        for _ in range(self._count):
            step, value, error = self._queue.get()
            if error is not None:
                raise error
            yield step, (value if self._place is None else self._place(value))

    def close(self) -> None:
        self._stop.set()
