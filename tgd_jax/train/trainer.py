"""The training loop of any TGD run: data-parallel steps, metrics, checkpoints, resume.

:func:`fit` runs a ``train_step`` from the state's step to ``cadence.num_steps``, in the
manner of the flax examples' loops, knowing nothing of the data or the model:

* ``batches(step)`` makes this process's rows of the global batch of ``step`` (host
  arrays) on a background thread, ``cadence.prefetch`` steps ahead; the loop shards them
  (on the main thread) over a 1-D ``('data',)`` mesh of all devices
  (:mod:`tgd_jax.train.parallel`). Make it a pure function of ``step`` and a resumed run
  sees exactly the batches an uninterrupted one would;
* every ``log_every`` steps a JSON line goes to ``metrics.jsonl`` and a progress line
  (loss, steps/s, ETA) to the log (:class:`~tgd_jax.train.metrics.MetricsLogger`); a
  non-finite loss stops the run there (:class:`NonFiniteLossError`), before any checkpoint
  of a diverged state is written;
* the same numbers and the learning rate go to TensorBoard event files in
  ``<workdir>/tensorboard`` (:mod:`tgd_jax.train.tensorboard`), and each ``hook`` adds its
  own after every validation (an image of the network's output, say);
* every ``eval_every`` steps (and at the end) ``evaluate(state)`` gives the validation
  loss and a checkpoint is saved (the last few kept, plus the best); at the steps of
  ``keep_steps`` too, and those checkpoints are kept for good;
* if ``workdir`` already holds checkpoints, the newest is restored first, so rerunning a
  killed command finishes with the same parameters as an uninterrupted run;
* the workdir is locked for the run (:func:`tgd_jax.io.workdir.lock_folder`): a second
  command on it is refused, and a workdir removed during the run stops it;
* SIGINT / SIGTERM under :func:`tgd_jax.io.errors.reported` stop it between writes: the
  checkpoint being saved is completed, nothing is half-written, and the rerun resumes;
* with several processes, process 0 alone writes files and logs, the checkpoints are
  written by all of them together (:mod:`tgd_jax.train.checkpoints`), and a process that
  stops makes the others stop at their next collective with a :class:`RunError` (a
  checkpoint in flight is left unfinished; the rerun of every process resumes from the
  newest complete one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from tgd_jax.errors import UsageError
from tgd_jax.io import workdir as workdir_lib
from tgd_jax.io.errors import Interrupted, RunError, one_line
from tgd_jax.train import parallel
from tgd_jax.train import step as step_lib
from tgd_jax.train.checkpoints import Checkpointer
from tgd_jax.train.metrics import (
    METRICS_FILE,
    MetricsLogger,
    NonFiniteLossError,
    check_finite,
    initial_losses,
    truncate_metrics,
)
from tgd_jax.train.prefetch import Prefetcher
from tgd_jax.train.tensorboard import EventWriter

__all__ = ["NonFiniteLossError", "fit", "resume", "Cadence", "Validator", "Hook"]

Batch = dict[str, Any]
#: ``hook(step, state, events)``: runs after each validation (and before the first step
#: of a fresh run), on the process that writes files only; it must not use collectives.
Hook = Callable[[int, step_lib.TrainState, EventWriter], None]


@dataclasses.dataclass(frozen=True)
class Cadence:
    """How long :func:`fit` trains and when it logs, validates and checkpoints.

    Attributes:
      num_steps: total steps of the run (not of this invocation).
      eval_every: steps between validations (each one saves a checkpoint).
      log_every: steps between metric records and progress lines.
      keep_checkpoints: the last N checkpoints are kept, plus the best.
      keep_steps: steps also validated and checkpointed for good (``<workdir>/kept``).
      prefetch: batches made ahead on the background thread.
    """

    num_steps: int
    eval_every: int
    log_every: int = 50
    keep_checkpoints: int = 3
    keep_steps: tuple[int, ...] = ()
    prefetch: int = 2

    def __post_init__(self) -> None:
        for name in ("num_steps", "eval_every", "log_every", "keep_checkpoints", "prefetch"):
            value = getattr(self, name)
            if not (isinstance(value, int | np.integer) and value >= 1):
                raise UsageError(f"Cadence.{name} must be a positive integer, got {value!r}")
        bad = [s for s in self.keep_steps if not 1 <= int(s) <= self.num_steps]
        if bad:
            raise UsageError(f"Cadence.keep_steps {bad} lie outside 1..{self.num_steps}")


def resume(ckpt: Checkpointer, state: step_lib.TrainState, metrics_path: Path | None,
           log: Callable[[str], None], devices: int | None = None) -> step_lib.TrainState:
    """The newest checkpoint restored into ``state`` (or ``state`` itself if there is none).

    ``metrics.jsonl`` is cut back to the restored step (to nothing on a fresh start), so the
    records written after that checkpoint by a killed invocation are not kept twice. A
    checkpoint written on another number of devices than ``devices`` resumes with a
    warning line: the continuation differs from an uninterrupted run in float32 rounding.
    """
    restored = ckpt.restore_latest(state, log)
    if restored is not None:
        state, meta = restored
        log(f"resuming from {ckpt.workdir / 'checkpoints'} at step {int(state.step)}")
        before = meta.get("devices")
        if devices is not None and before is not None and int(before) != devices:
            log(f"warning: the checkpoint was written on {before} devices and this run has "
                f"{devices}: the result will differ from an uninterrupted run by float32 "
                f"reduction order (--cpu_devices={before} on a CPU keeps it)")
    if metrics_path is not None:
        truncate_metrics(metrics_path, int(state.step) if restored is not None else -1, log)
    if restored is not None:  # every process: the rebuild is collective
        ckpt.reconcile_best(ckpt.workdir / METRICS_FILE, int(state.step), log)
    return state


class Validator:
    """Mean inference-mode loss of a state on the validation set and any extra held-out sets.

    Args:
      eval_fn: jitted ``eval_step(state, batch) -> {"loss": scalar}``.
      batches: the validation batches (they choose the best checkpoint).
      extra: name -> batches of more held-out sets, logged as ``val_loss_<name>``.
    """

    def __init__(self, eval_fn: Callable[..., dict[str, jax.Array]], batches: list[Batch],
                 extra: Mapping[str, list[Batch]] | None = None) -> None:
        self.eval_fn, self.batches, self.extra = eval_fn, batches, dict(extra or {})

    def loss(self, state: step_lib.TrainState, batches: list[Batch] | None = None) -> float:
        batches = self.batches if batches is None else batches
        return float(np.mean([float(self.eval_fn(state, b)["loss"]) for b in batches]))

    def __call__(self, state: step_lib.TrainState) -> tuple[float, dict[str, float]]:
        """``(validation loss, {"val_loss_<name>": loss})``."""
        return self.loss(state), {f"val_loss_{name}": self.loss(state, b)
                                  for name, b in self.extra.items()}


@dataclasses.dataclass
class _Run:
    """What every part of one :func:`fit` invocation shares."""

    workdir: Path
    cadence: Cadence
    mesh: jax.sharding.Mesh
    log: Callable[[str], None]
    check: Callable[[], None]  # before each write: the workdir is still ours
    one_in_flight: bool  # wait for each step (parallel.one_step_in_flight)
    metrics_path: Path | None  # None on the processes that write nothing

    @property
    def main(self) -> bool:
        return self.metrics_path is not None


def fit(
    state: step_lib.TrainState,
    train_step: Callable[[step_lib.TrainState, Batch], tuple[step_lib.TrainState, Any]],
    batches: Callable[[int], Batch],
    evaluate: Callable[[step_lib.TrainState], tuple[float, dict[str, float]]],
    workdir: str | Path,
    cadence: Cadence,
    *,
    hooks: Sequence[Hook] = (),
    mesh: jax.sharding.Mesh | None = None,
    meta: Mapping[str, Any] | None = None,
    learning_rate: Callable[[int], float] | None = None,
    constants: Mapping[str, float] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[step_lib.TrainState, dict[str, Any]]:
    """Trains ``state`` to ``cadence.num_steps`` steps in ``workdir`` (resuming if it can).

    Args:
      state: the starting :class:`~tgd_jax.train.step.TrainState` (also the template a
        checkpoint is restored into).
      train_step: ``(state, batch) -> (state, metrics)``, pure (e.g.
        :func:`tgd_jax.train.step.train_step` with the model and optimizer bound); jitted
        here over ``mesh`` (state replicated, batch sharded on its first axis). ``metrics``
        holds at least ``"loss"``.
      batches: ``step -> batch``, this process's rows of the global batch of ``step``
        (:func:`tgd_jax.train.parallel.process_rows`) as host arrays; called in step
        order on a background thread, so it must not use JAX.
      evaluate: ``state -> (validation loss, {name: loss})`` (a :class:`Validator`); the
        first number chooses the best checkpoint, the others are logged by name.
      workdir: where metrics, TensorBoard files and checkpoints go.
      cadence: the number of steps and when to log, validate and checkpoint.
      hooks: each runs after every validation (see :data:`Hook`).
      mesh: device mesh (default: all devices).
      meta: extra JSON stored with every checkpoint.
      learning_rate: ``step -> the learning rate of the update that made step``, logged.
      constants: numbers of the run shown in TensorBoard with each validation
        (``run/<name>``), e.g. the retrained fraction.

    Returns:
      The final state and the run summary (steps, initial/final/best validation loss, the
      invocation's wall time, devices; ``initial_<name>`` / ``final_<name>`` of the extra
      held-out losses).

    Raises:
      NonFiniteLossError: at the first step whose loss is not finite; the checkpoints
        written before it are kept.
      FolderInUseError: if another live run holds ``workdir``.
      RunError: if ``workdir`` is removed or replaced during the run.
      Interrupted: on SIGINT/SIGTERM (naming the last complete checkpoint).
      RunError: with several processes, a collective, a barrier or a checkpoint write
        failing (another process stopped, most likely), naming this process; this
        process's own faults keep their type and traceback.
    """
    workdir = Path(workdir)
    main = jax.process_index() == 0  # on several hosts only the first one writes files
    log = log if main else _silent
    mesh = mesh or parallel.make_mesh()
    one_in_flight = parallel.one_step_in_flight(mesh)  # jaxlib 0.10's CPU all-reduce
    # Held since prepare_workdir (re-entrant), released when training ends, however it ends.
    lock = workdir_lib.lock_folder(workdir, "fit", log=log) if main else None
    run = _Run(workdir=workdir, cadence=cadence, mesh=mesh, log=log, one_in_flight=one_in_flight,
               check=lock.check if lock else _nothing,
               metrics_path=workdir / METRICS_FILE if main else None)
    try:
        ckpt = Checkpointer(workdir, keep=cadence.keep_checkpoints, log=log)
        devices = int(mesh.devices.size)
        meta = {**(meta or {}), "devices": devices}
        state = parallel.replicate(resume(ckpt, state, run.metrics_path, log, devices), mesh)
        start = int(state.step)
        # A resumed run hides in TensorBoard what a killed invocation wrote after its
        # checkpoint (as metrics.jsonl is cut back); a fresh start hides a failed first
        # attempt's.
        events = EventWriter(workdir, enabled=main, purge_step=start + 1 if start else 0)
        logger = MetricsLogger(run.metrics_path, cadence.num_steps, start, log, events=events,
                               learning_rate=learning_rate, constants=constants)
        try:
            return _loop(run, state, start, parallel.jit_step(train_step, mesh), batches,
                         evaluate, ckpt, meta, logger, events, hooks if main else ())
        finally:
            events.close()
    finally:
        if lock:
            lock.release()


def _loop(run: _Run, state: step_lib.TrainState, start: int, train_fn: Callable[..., Any],
          batches: Callable[[int], Batch],
          evaluate: Callable[[step_lib.TrainState], tuple[float, dict[str, float]]],
          ckpt: Checkpointer, meta: dict[str, Any], logger: MetricsLogger,
          events: EventWriter, hooks: Sequence[Hook]) -> tuple[step_lib.TrainState,
                                                               dict[str, Any]]:
    """The steps of :func:`fit` from ``start``, with validations, checkpoints and the summary."""
    workdir, cadence, log, check, num_steps = (run.workdir, run.cadence, run.log, run.check,
                                               run.cadence.num_steps)

    def show(step: int) -> None:
        for hook in hooks:
            hook(step, state, events)

    where = lambda: (f" The last good checkpoint is step {ckpt.latest_step} in "  # noqa: E731
                     f"{workdir / 'checkpoints'}")
    if start >= num_steps:
        log(f"{workdir} already finished ({start} of {num_steps} steps)")
    if start > 0:  # a resumed run keeps the step-0 losses its first invocation recorded
        initial, initial_extra = initial_losses(workdir / METRICS_FILE)
    else:  # the starting network's validation loss: what training must improve on
        initial, initial_extra = evaluate(state)
        logger.validation(0, initial, initial_extra)
        show(0)
    last_val, last_extra = None, {}
    kept_steps = frozenset(int(s) for s in cadence.keep_steps)
    pending: list[Any] = []
    done = start
    prefetch = Prefetcher(batches, start, num_steps, depth=cadence.prefetch,
                          place=functools.partial(parallel.shard_batch, mesh=run.mesh))
    try:
        for step, batch in prefetch:
            state, metrics = train_fn(state, batch)
            if run.one_in_flight:
                jax.block_until_ready(metrics)
            pending.append(metrics)
            done = step + 1
            kept = done in kept_steps
            validate = done % cadence.eval_every == 0 or done == num_steps or kept
            if pending and (validate or done % cadence.log_every == 0):
                check()
                logger.train(done, jax.device_get(pending), first_step=done - len(pending),
                             where=where())
                pending.clear()
            if validate:
                last_val, last_extra = evaluate(state)
                check_finite("validation loss", last_val, done, where())
                check()
                # The record before the checkpoint: a run killed in between (with several
                # processes, one waiting in the save's barrier for a dead one) resumes from
                # an earlier checkpoint and drops it, or from this one and keeps it.
                logger.validation(done, last_val, last_extra, best=last_val < ckpt.best_loss)
                ckpt.save(done, state, meta, val_loss=last_val, kept=kept)
                show(done)
    except Interrupted as stop:
        if parallel.multi_process():  # completing a checkpoint needs every process
            raise Interrupted(stop.signum, f"{stop} at step {done}; rerun every process to "
                              "resume from the newest complete checkpoint in "
                              f"{workdir / 'checkpoints'}") from None
        with contextlib.suppress(Interrupted):  # a second Ctrl-C changes nothing here
            ckpt.close()  # completes the checkpoint in flight: the rerun resumes from it
        last = ckpt.latest_step
        raise Interrupted(stop.signum, f"{stop} at step {done}; nothing was half-written; " + (
            f"rerun the same command to resume from step {last} ({workdir / 'checkpoints'})"
            if last is not None else "no checkpoint yet, a rerun starts over")) from None
    except BaseException as error:
        if parallel.multi_process():
            # Closing the checkpointer would wait for processes that may be gone.
            failure = _process_failure(error, done, workdir)
            if failure is error:
                raise
            raise failure from error
        with contextlib.suppress(Exception):  # the first error is the one to report
            ckpt.close()  # no orbax write left running behind the error
        raise
    finally:
        prefetch.close()
    ckpt.wait()
    if last_val is None:  # nothing left to train: report the restored network
        last_val, last_extra = evaluate(state)
    summary = {
        "steps": int(state.step),
        "final_val_loss": last_val,
        "best_val_loss": ckpt.best_loss if math.isfinite(ckpt.best_loss) else None,
        "best_step": ckpt.best_step,
        "initial_val_loss": initial,
        "resumed_from": start if start else None,
        "wall_s_this_invocation": logger.elapsed(),
        "devices": int(run.mesh.devices.size),
        **{f"initial_{k}": v for k, v in initial_extra.items()},
        **{f"final_{k}": v for k, v in last_extra.items()},
    }
    ckpt.close()
    return state, summary


def _process_failure(error: BaseException, step: int, workdir: Path) -> BaseException:
    """What a process of a multi-process run reports when its loop fails: a collective or
    a barrier failing (:data:`~tgd_jax.train.parallel.COLLECTIVE_FAILURES`, as when another
    process stopped) as a :class:`RunError` pointing at the others; anything else as it
    is: our own errors (every process meets them alike) and this process's own faults,
    which keep their traceback (a bug here is not another process's stop)."""
    if not isinstance(error, parallel.COLLECTIVE_FAILURES):
        return error
    return RunError(
        f"process {jax.process_index()} of {jax.process_count()} stopped at step {step}: "
        f"{one_line(error)[:300]}; if another process of this run stopped, that is the "
        f"cause (see its output). Rerun every process to resume from the newest complete "
        f"checkpoint in {workdir / 'checkpoints'}")


def _silent(message: str) -> None:
    del message


def _nothing() -> None:
    """The workdir check of processes that write nothing (multi-host, not the first)."""
