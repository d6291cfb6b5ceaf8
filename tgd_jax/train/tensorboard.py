"""TensorBoard event files for a run (``tensorboard --logdir runs/demo`` shows a reproduction).

:class:`EventWriter` writes the same numbers as ``metrics.jsonl`` (which stays the record
the reports read) and images of a fixed validation slice, with ``tensorboardX``'s writer:
the field's standard event format without TensorFlow. Only the first process of a
multi-process run writes.

Events are written on the caller's thread (tensorboardX's record writer, without its
background thread and exit hook): a write that fails (a full disk, a file-size limit) is
one :class:`~tgd_jax.errors.RunError` naming the event file, raised where the run can stop
cleanly, instead of a traceback from a thread and another at exit.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from tgd_jax.errors import RunError

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

    #: Seconds between flushes to disk (and at close).
    FLUSH_SECS = 30.0

    def __init__(self, workdir: str | Path, enabled: bool = True,
                 purge_step: int | None = None) -> None:
        self._writer = None
        self._path = ""
        self._flushed = time.monotonic()
        if not enabled:
            return
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        folder = Path(workdir) / EVENTS_DIR
        # The name has the second it was made; the suffix keeps a run resumed within that
        # second from replacing the file, and sorts after it (as TensorBoard reads).
        suffix = f".{time.time_ns()}"
        self._path = str(folder / (f"events.out.tfevents.{str(time.time())[:10]}."
                                   f"{socket.gethostname()}{suffix}"))
        self._guarded(lambda: folder.mkdir(parents=True, exist_ok=True))
        self._writer = self._guarded(lambda: EventsWriter(str(folder / "events"), suffix))
        self._path = self._writer._file_name  # what tensorboardX named it
        if purge_step is not None:  # TensorBoard hides the earlier entries from this step on
            self._write(Event(step=purge_step, file_version="brain.Event:2"))
            self._write(Event(step=purge_step,
                              session_log=SessionLog(status=SessionLog.START)))

    def _guarded(self, write: Any) -> Any:
        try:
            return write()
        except OSError as error:
            self._writer = None  # nothing more is written to a file that failed
            raise RunError(f"{self._path}: writing TensorBoard events failed "
                           f"({error.strerror or error}); metrics.jsonl and the checkpoints "
                           "hold the run, rerun the same command to resume") from error

    def _write(self, event: Any) -> None:
        if self._writer is None:
            return
        writer = self._writer
        self._guarded(lambda: writer.write_event(event))
        if time.monotonic() - self._flushed > self.FLUSH_SECS:
            self.flush()

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        """One scalar per finite number of ``values`` (others are skipped)."""
        if self._writer is None:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for tag, value in values.items():
            if isinstance(value, int | float | np.floating | np.integer) and np.isfinite(value):
                self._write(Event(summary=scalar(tag, float(value)), step=int(step),
                                  wall_time=time.time()))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A grey ``(H, W)`` image (or side-by-side panels ``(H, W * k)``), scaled to [0, 1]
        by its 1st and 99th percentiles."""
        if self._writer is None:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import image as image_summary

        image = np.asarray(image, np.float32)
        lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
        scaled = np.clip((image - lo) / max(float(hi - lo), 1e-12), 0.0, 1.0)
        self._write(Event(summary=image_summary(tag, scaled[None], dataformats="CHW"),
                          step=int(step), wall_time=time.time()))

    def flush(self) -> None:
        if self._writer is not None:
            writer = self._writer
            self._guarded(writer.flush)
            self._flushed = time.monotonic()

    def close(self) -> None:
        if self._writer is not None:
            writer = self._writer
            self._guarded(writer.close)
            self._writer = None


def read_events(workdir: str | Path) -> list[dict[str, Any]]:
    """Every scalar and image summary of ``<workdir>/tensorboard`` as dicts (``tag``,
    ``step``, ``value`` or ``image`` bytes), in file order, as TensorBoard shows them: a
    resumed run's restart (``purge_step``) drops the earlier entries from its step on. A
    record cut short (a write that failed) ends its file. A reader for tests and scripts,
    with no TensorFlow or TensorBoard needed.

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
            if offset + 12 + length + 4 > len(data):  # torn: the rest was never written
                break
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
