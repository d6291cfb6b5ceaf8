"""TensorBoard event files for a run (``tensorboard --logdir runs/demo`` shows a reproduction).

:class:`EventWriter` writes the same numbers as ``metrics.jsonl`` (which stays the record
the reports read) and images of a fixed validation slice, with ``tensorboardX``'s writer:
the field's standard event format without TensorFlow. Only the first process of a
multi-process run writes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EventWriter", "read_events"]

#: The folder of a workdir that holds the event files.
EVENTS_DIR = "tensorboard"


class EventWriter:
    """Scalars and images of one run, in ``<workdir>/tensorboard``.

    Args:
      workdir: the run's folder.
      enabled: False makes every call a no-op (processes other than the first).
      purge_step: a resumed run's first new step: TensorBoard hides what an earlier,
        killed invocation wrote from this step on (they are written again), as
        ``metrics.jsonl`` is cut back to the checkpoint (:func:`read_events` does the same).

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     writer = EventWriter(d)
      ...     writer.scalars(10, {"loss": 0.5, "val_loss": None})  # None: not logged
      ...     writer.close()
      ...     [(e["tag"], e["step"], e["value"]) for e in read_events(d)]
      [('loss', 10, 0.5)]
    """

    def __init__(self, workdir: str | Path, enabled: bool = True,
                 purge_step: int | None = None) -> None:
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            # The name has the second it was made; the suffix keeps a run resumed within
            # that second from replacing the file, and sorts after it (as TensorBoard reads).
            self._writer = SummaryWriter(str(Path(workdir) / EVENTS_DIR), flush_secs=30,
                                         purge_step=purge_step,
                                         filename_suffix=f".{time.time_ns()}")

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        """One scalar per finite number of ``values`` (others are skipped)."""
        if self._writer is None:
            return
        for tag, value in values.items():
            if isinstance(value, int | float | np.floating | np.integer) and np.isfinite(value):
                self._writer.add_scalar(tag, float(value), int(step))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A grey ``(H, W)`` image (or side-by-side panels ``(H, W * k)``), scaled to [0, 1]
        by its 1st and 99th percentiles."""
        if self._writer is None:
            return
        image = np.asarray(image, np.float32)
        lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
        scaled = np.clip((image - lo) / max(float(hi - lo), 1e-12), 0.0, 1.0)
        self._writer.add_image(tag, scaled[None], int(step), dataformats="CHW")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_events(workdir: str | Path) -> list[dict[str, Any]]:
    """Every scalar and image summary of ``<workdir>/tensorboard`` as dicts (``tag``,
    ``step``, ``value`` or ``image`` bytes), in file order, as TensorBoard shows them: a
    resumed run's restart (``purge_step``) drops the earlier entries from its step on. A
    reader for tests and scripts, with no TensorFlow or TensorBoard needed.

    Example:
      >>> read_events("/nonexistent")
      []
    """
    from tensorboardX.proto import event_pb2

    out: list[dict[str, Any]] = []
    for path in sorted((Path(workdir) / EVENTS_DIR).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):  # TFRecord: length, crc, data, crc
            length = int.from_bytes(data[offset:offset + 8], "little")
            record = data[offset + 12:offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event()
            event.ParseFromString(record)
            if event.HasField("session_log") and \
                    event.session_log.status == event.session_log.START:
                out = [entry for entry in out if entry["step"] < event.step]
            for value in event.summary.value:
                entry: dict[str, Any] = {"tag": value.tag, "step": int(event.step)}
                if value.HasField("image"):
                    entry["image"] = value.image.encoded_image_string
                else:
                    entry["value"] = float(value.simple_value)
                out.append(entry)
    return out
