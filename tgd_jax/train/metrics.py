"""A run's ``metrics.jsonl``, its TensorBoard scalars and progress lines: rates, ETA, and the
non-finite check.

:class:`MetricsLogger` is the only writer of ``metrics.jsonl``. Training steps are recorded
in groups (one JSON line per ``log_every`` steps, with the mean loss, the last step's
gradient norm, steps/s and ETA); validations get a line of their own. The same numbers go
to TensorBoard when an :class:`~tgd_jax.train.tensorboard.EventWriter` is given
(:data:`TENSORBOARD_TAGS`). A non-finite loss raises :class:`NonFiniteLossError` before
anything is written for it, so the files and the checkpoints never describe a diverged
state.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tgd_jax.errors import UsageError
from tgd_jax.io import workdir as workdir_lib
from tgd_jax.io.errors import RunError
from tgd_jax.train.tensorboard import EventWriter

__all__ = ["METRICS_FILE", "NonFiniteLossError", "MetricsLogger", "check_finite",
           "truncate_metrics", "initial_losses", "read_metrics", "hms", "TENSORBOARD_TAGS",
           "plateau", "PLATEAU_FALL"]

#: A schedule has reached its plateau when the held-out loss fell by less than this fraction
#: over its last quarter (:func:`plateau`).
PLATEAU_FALL = 0.05

#: The file of a workdir that holds one JSON record per log or validation step.
METRICS_FILE = "metrics.jsonl"
#: ``metrics.jsonl`` field -> TensorBoard tag (``val_loss_<name>`` -> ``val/loss_<name>``,
#: a run's constants -> ``run/<name>``).
TENSORBOARD_TAGS = {"loss": "train/loss", "grad_norm": "train/grad_norm",
                    "steps_per_s": "train/steps_per_s", "learning_rate": "train/learning_rate",
                    "gate_cosine": "train/gate_cosine", "val_loss": "val/loss"}


class NonFiniteLossError(RunError, FloatingPointError):
    """The training or validation loss became NaN or infinite."""


def check_finite(what: str, value: float, step: int, where: str = "") -> None:
    """Raises :class:`NonFiniteLossError` if ``value`` (``what`` at ``step``) is NaN or inf."""
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{what} is {value} at step {step}; stopped.{where}")


class MetricsLogger:
    """Writes metric records and progress lines for one invocation of a run.

    Args:
      path: the ``metrics.jsonl`` file (None: write no file, e.g. on a non-main host).
      num_steps: total steps of the run (for the ETA and the ``step i/n`` lines).
      start: the step this invocation starts from (rates count from it).
      log: where progress lines go.
      clock: seconds (injectable for tests).
      events: TensorBoard writer of the same numbers (None: none).
      learning_rate: ``step -> the learning rate of the update that made step``
        (``schedule(step - 1)``), shown in TensorBoard with each training record.
      constants: numbers of the run shown in TensorBoard with each validation (e.g.
        ``{"retrained_fraction": 0.3}``), as ``run/<name>``.
    """

    def __init__(self, path: Path | None, num_steps: int, start: int = 0,
                 log: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.perf_counter,
                 events: EventWriter | None = None,
                 learning_rate: Callable[[int], float] | None = None,
                 constants: Mapping[str, float] | None = None) -> None:
        self.path, self.num_steps, self.log, self.clock = path, num_steps, log, clock
        self.events, self.learning_rate = events, learning_rate
        self.constants = dict(constants or {})
        self.t_start = self.t_last = clock()
        self.steps_at_last = start

    def elapsed(self) -> float:
        return self.clock() - self.t_start

    def train(self, step: int, values: Sequence[Mapping[str, Any]], *,
              first_step: int, where: str = "") -> dict[str, Any]:
        """Records the training steps ``first_step + 1 .. step`` (their metrics, in order).

        Raises:
          NonFiniteLossError: naming the first step whose loss is not finite (and
            ``where``, e.g. the last good checkpoint); nothing is written then.
        """
        losses = [float(m["loss"]) for m in values]
        for i, loss in enumerate(losses):
            check_finite("training loss", loss, first_step + i + 1, where)
        now = self.clock()
        rate = (step - self.steps_at_last) / max(now - self.t_last, 1e-9)
        record = {"step": step, "loss": float(np.mean(losses)), "loss_last": losses[-1],
                  "grad_norm": float(values[-1]["grad_norm"]), "steps_per_s": rate,
                  "elapsed_s": now - self.t_start,
                  "eta_s": (self.num_steps - step) / max(rate, 1e-9)}
        if "gate_cosine" in values[-1]:  # mean over the steps since the last record
            record["gate_cosine"] = float(np.mean([float(m["gate_cosine"]) for m in values]))
        self._append(record)
        self._scalars(step, {**record, **({"learning_rate": self.learning_rate(step)}
                                          if self.learning_rate else {})})
        self.log(f"step {step}/{self.num_steps}  loss {record['loss']:.5g}  {rate:.2f} steps/s"
                 f"  ETA {hms(record['eta_s'])}")
        self.t_last, self.steps_at_last = now, step
        return record

    def validation(self, step: int, val_loss: float, extra: Mapping[str, float], *,
                   best: bool | None = None, where: str = "") -> dict[str, Any]:
        """Records a validation (``best`` None: the step-0 one, before training).

        Raises:
          NonFiniteLossError: if ``val_loss`` is not finite; nothing is written then.
        """
        check_finite("validation loss", val_loss, step, where)
        record: dict[str, Any] = {"step": step, "val_loss": val_loss}
        if best is not None:
            record["best"] = best
        record.update(extra)
        self._append(record)
        self._scalars(step, {**record, **self.constants})
        tail = "".join(f"  {k} {v:.5g}" for k, v in extra.items())
        note = " (before training)" if best is None else "  (best)" if best else ""
        self.log(f"step {step}/{self.num_steps}  validation loss {val_loss:.5g}{note}{tail}")
        return record

    def _append(self, record: Mapping[str, Any]) -> None:
        if self.path is not None:
            workdir_lib.append_jsonl(self.path, record)

    def _scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """``values`` under their TensorBoard tags (fields without one are not shown)."""
        if self.events is None:
            return
        tags = {**TENSORBOARD_TAGS, **{k: f"val/loss_{k[len('val_loss_'):]}" for k in values
                                       if k.startswith("val_loss_")},
                **{k: f"run/{k}" for k in self.constants}}
        self.events.scalars(step, {tags[k]: v for k, v in values.items() if k in tags})


def read_metrics(path: str | Path, log: Callable[[str], None] = print
                 ) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` ([] if there is none).

    A torn tail (a line cut by a power loss or a full disk, or NUL bytes a file system left
    after a crash) is dropped with one line in ``log``: those records are lost (the resume
    rewrites only the ones after its checkpoint), not the run.
    A damaged line followed by intact ones is not a torn tail.

    Raises:
      RunError: a damaged line before the last one, naming the file and the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    records: list[dict[str, Any]] = []
    for number, raw in enumerate(lines, 1):
        text = raw.strip(b" \t\r")
        if not text:
            continue
        try:
            if b"\x00" in text:  # what a file system leaves of a write cut by a crash
                raise UsageError("NUL bytes")
            record = json.loads(text)
            if not isinstance(record, dict):
                raise UsageError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as error:
            if any(rest.strip(b"\x00 \t\r") for rest in lines[number:]):  # intact after
                raise RunError(f"{path}: line {number} is not a metrics record ({error}); "
                               "the file was edited or damaged, and the lines after it are "
                               "intact: repair or delete that line") from None
            log(f"warning: {path}: dropped a torn last line ({len(raw)} bytes, line {number}): "
                "a write was cut short; the run resumes from its checkpoint")
            break
        records.append(record)
    return records


def truncate_metrics(path: Path, last_step: int, log: Callable[[str], None] = print) -> None:
    """Drops records past ``last_step`` (written after the checkpoint a resume starts from),
    and a torn tail (:func:`read_metrics`)."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path, log) if r.get("step", 0) <= last_step]
    workdir_lib.atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())


def initial_losses(path: Path) -> tuple[float | None, dict[str, float]]:
    """The step-0 validation losses recorded in ``metrics.jsonl`` (None, {} if absent)."""
    for record in read_metrics(path, log=lambda _: None):
        if record.get("step") == 0 and "val_loss" in record:
            return record["val_loss"], {k: v for k, v in record.items()
                                        if k.startswith("val_loss_")}
    return None, {}


def hms(seconds: float) -> str:
    """``3725 -> '1:02:05'``."""
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def plateau(records: Sequence[Mapping[str, Any]], num_steps: int, *,
            fraction: float = 0.25) -> dict[str, Any]:
    """How much the held-out loss fell over the last ``fraction`` of a run's steps.

    ``records``: ``metrics.jsonl`` records; those with ``val_loss`` are used. The fall is
    ``(L(a) - L(b)) / L(a)``, with ``b`` the last validated step and ``a`` the last
    validated step at or before ``b - fraction * num_steps``. Returns ``{"from_step": a,
    "to_step": b, "fall": ..., "plateau": fall < PLATEAU_FALL}``.

    Raises:
      UsageError: no validation that far back (validate more often than ``fraction`` of
        the run), or the run has not reached ``num_steps``.
    """
    vals = sorted((int(r["step"]), float(r["val_loss"])) for r in records if "val_loss" in r)
    if not vals or vals[-1][0] < num_steps:
        raise UsageError(f"the run has no validation at its last step {num_steps} (last: "
                         f"{vals[-1][0] if vals else None}); the plateau is judged at the end")
    b, loss_b = vals[-1]
    earlier = [(s, v) for s, v in vals if s <= b - fraction * num_steps]
    if not earlier:
        raise UsageError(f"no validation at or before step {b - fraction * num_steps:g}: "
                         "validate at least every quarter of the run")
    a, loss_a = earlier[-1]
    fall = (loss_a - loss_b) / loss_a
    return {"from_step": a, "to_step": b, "fall": fall, "plateau": bool(fall < PLATEAU_FALL)}
