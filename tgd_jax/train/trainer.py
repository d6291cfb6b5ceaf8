"""The training loop shared by every command: data-parallel steps, metrics, checkpoints, resume.

:func:`fit` runs ``train_step`` from the state's step to ``num_steps``:

* batches are :func:`tgd_jax.train.data.sample_batch` of ``(seed, step)``, sampled ahead on a
  thread and sharded (on the main thread) over a 1-D ``('data',)`` mesh of all devices
  (:mod:`tgd_jax.train.parallel`); with several processes each makes only its own rows of
  the same global batch, so the run does not depend on how many processes share it;
* every ``log_every`` steps a JSON line goes to ``metrics.jsonl`` and a progress line
  (loss, steps/s, ETA) to the log (:class:`~tgd_jax.train.metrics.MetricsLogger`); a
  non-finite loss stops the run there (:class:`NonFiniteLossError`), before any checkpoint
  of a diverged state is written;
* the same numbers, the learning rate, and at each evaluation an image of a fixed
  validation slice (input | output | target) go to TensorBoard event files in
  ``<workdir>/tensorboard`` (:mod:`tgd_jax.train.tensorboard`);
* every ``eval_every`` steps (and at the end) the validation loss is measured and a
  checkpoint saved (the last few kept, plus the best); at the steps of ``keep_steps`` too,
  and those checkpoints are kept for good;
* if ``workdir`` already holds checkpoints, the newest is restored first, so rerunning a
  killed command finishes with the same parameters as an uninterrupted run;
* the workdir is locked for the run (:func:`tgd_jax.train.workdir.lock_folder`): a second
  command on it is refused, and a workdir removed during the run stops it;
* SIGINT / SIGTERM under :func:`tgd_jax.train.errors.reported` stop it between writes: the
  checkpoint being saved is completed, nothing is half-written, and the rerun resumes;
* with several processes, process 0 alone writes files and logs, the checkpoints are
  written by all of them together (:mod:`tgd_jax.train.checkpoints`), and a process that
  stops makes the others stop at their next collective with a :class:`RunError` (a
  checkpoint in flight is left unfinished; the rerun of every process resumes from the
  newest complete one).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from tgd_jax import optim
from tgd_jax.errors import UsageError
from tgd_jax.train import data as data_lib
from tgd_jax.train import parallel
from tgd_jax.train import step as step_lib
from tgd_jax.train import workdir as workdir_lib
from tgd_jax.train.checkpoints import Checkpointer
from tgd_jax.train.errors import Interrupted, RunError, one_line
from tgd_jax.train.metrics import (
    METRICS_FILE,
    MetricsLogger,
    NonFiniteLossError,
    check_finite,
    initial_losses,
    truncate_metrics,
)
from tgd_jax.train.tensorboard import EventWriter

__all__ = ["NonFiniteLossError", "fit", "resume", "validation_batches", "Validator",
           "learning_rate_at", "SlicePanel"]

Batch = dict[str, jax.Array]


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


def validation_batches(pairs: data_lib.PairSet, *, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh) -> list[Batch]:
    """``config.eval_batches`` fixed, unaugmented global batches of ``pairs`` (the same every
    run, whatever the number of processes: each makes its own rows)."""
    rows = parallel.process_rows(config.batch_size, mesh)
    return [parallel.shard_batch(data_lib.sample_batch(
        pairs, seed=config.seed, step=i, batch_size=config.batch_size,
        patch_size=config.data.patch_size, augment=False, stream=data_lib.STREAM_VAL,
        rows=rows), mesh) for i in range(config.eval_batches)]


def learning_rate_at(config: ml_collections.ConfigDict, num_steps: int
                     ) -> Callable[[int], float]:
    """``step -> the learning rate of the update that made step``: the schedule of
    :func:`tgd_jax.optim.make_optimizer` (``config.optimizer``) at count ``step - 1``."""
    o = config.optimizer
    schedule = optim.learning_rate_schedule(
        o.learning_rate, o.schedule, num_steps, decay_fraction=o.get("decay_fraction", 1.0),
        final_lr_fraction=o.get("final_lr_fraction", 0.0),
        warmup_steps=o.get("warmup_steps", 0))
    return lambda step: float(schedule(max(0, step - 1)))


class SlicePanel:
    """The image TensorBoard shows at each evaluation: one fixed validation slice as
    ``input | output | target`` side by side, ``(H, 3 W)``.

    The slice is the middle one of the first pair of ``pairs`` (its 2.5D stack in, the
    network's centre channel out, as :mod:`tgd_jax.pet.denoise` uses it). The network runs
    in inference mode on this process's copy of the state (no collective).
    """

    def __init__(self, model: nn.Module, pairs: data_lib.PairSet) -> None:
        source, target = (pairs.volumes[i] for i in pairs.pairs[0])
        z = source.shape[0] // 2  # 1 <= z <= Z - 2: PairSet volumes have Z >= 3
        self.stack = np.moveaxis(source[z - 1:z + 2], 0, -1)[None]  # (1, H, W, 3)
        self.input, self.target = source[z], target[z]
        self._apply = jax.jit(lambda variables, x: model.apply(variables, x, train=False))

    def __call__(self, state: step_lib.TrainState) -> np.ndarray:
        local = parallel.host_copy({"params": state.params, "batch_stats": state.batch_stats})
        variables = {k: v for k, v in local.items() if v}
        output = np.asarray(self._apply(variables, self.stack))[0, ..., 1]
        return np.concatenate([self.input, output, self.target], axis=1)


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


def fit(
    *,
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    model: nn.Module,
    tx: optax.GradientTransformation,
    state: step_lib.TrainState,
    train_pairs: data_lib.PairSet,
    val_pairs: data_lib.PairSet | None,
    num_steps: int,
    meta: Mapping[str, Any] | None = None,
    freeze_batch_stats: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    log: Callable[[str], None] = print,
    extra_val: Mapping[str, data_lib.PairSet] | None = None,
    gate_cosine: bool = False,
    graph: Any = None,
    constants: Mapping[str, float] | None = None,
) -> tuple[step_lib.TrainState, dict[str, Any]]:
    """Trains ``state`` to ``num_steps`` steps in ``workdir`` (resuming if it can).

    Args:
      config: the run's config (seed, batch_size, data.*, log/eval/checkpoint cadence).
      workdir: where metrics and checkpoints go.
      model, tx: the network and the full optimizer (TGD mask included).
      state: the starting state (also the template a checkpoint is restored into).
      train_pairs, val_pairs: data; ``val_pairs=None`` validates on fixed training patches.
      num_steps: total steps of the run (not of this invocation).
      meta: extra JSON stored with every checkpoint.
      freeze_batch_stats: keep the BatchNorm statistics of frozen channels.
      mesh: device mesh (default: all devices).
      extra_val: more held-out sets, by name (e.g. ``{"old": ...}`` for the old task):
        measured with the validation loss, logged as ``val_loss_<name>``, and reported in
        the summary as ``initial_val_loss_<name>`` / ``final_val_loss_<name>``; they do
        not choose the best checkpoint.
      gate_cosine: log the cosine between the gated and the true gradient
        (:func:`tgd_jax.train.step.train_step`).
      graph: the plan's channel graph when its paper-mode gates are automatic
        (``plan.auto_gates``; :func:`tgd_jax.autogate.gated_by`).
      constants: numbers of the run shown in TensorBoard with each validation
        (``run/<name>``), e.g. the retrained fraction.

    Returns:
      The final state and the run summary (the commands add their fields and write it
      to ``summary.json``).

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
    if config.loss not in step_lib.LOSSES:
        raise UsageError(f"loss must be one of {sorted(step_lib.LOSSES)}, got {config.loss!r}")
    workdir = Path(workdir)
    main = jax.process_index() == 0  # on several hosts only the first one writes files
    log = log if main else _silent
    metrics_path = workdir / METRICS_FILE if main else None
    mesh = mesh or parallel.make_mesh()
    parallel.process_rows(config.batch_size, mesh)  # the batch splits over this mesh
    # Held since prepare_workdir (re-entrant), released when training ends, however it ends.
    lock = workdir_lib.lock_folder(workdir, "fit", log=log) if main else None
    try:
        return _fit(config=config, workdir=workdir, model=model, tx=tx, state=state,
                    train_pairs=train_pairs, val_pairs=val_pairs, num_steps=num_steps,
                    meta=meta, freeze_batch_stats=freeze_batch_stats, mesh=mesh, log=log,
                    extra_val=extra_val, gate_cosine=gate_cosine, graph=graph,
                    metrics_path=metrics_path, check=lock.check if lock else _nothing,
                    constants=constants)
    finally:
        if lock:
            lock.release()


def _fit(*, config: ml_collections.ConfigDict, workdir: Path, model: nn.Module,
         tx: optax.GradientTransformation, state: step_lib.TrainState,
         train_pairs: data_lib.PairSet, val_pairs: data_lib.PairSet | None, num_steps: int,
         meta: Mapping[str, Any] | None, freeze_batch_stats: bool, mesh: jax.sharding.Mesh,
         log: Callable[[str], None], extra_val: Mapping[str, data_lib.PairSet] | None,
         gate_cosine: bool, graph: Any, metrics_path: Path | None,
         check: Callable[[], None], constants: Mapping[str, float] | None
         ) -> tuple[step_lib.TrainState, dict[str, Any]]:
    """:func:`fit` in its locked workdir; ``check()`` before each write (workdir still ours)."""
    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints, log=log)
    devices = int(mesh.devices.size)
    meta = {"config": config.to_dict(), "devices": devices, **(meta or {})}
    main = metrics_path is not None

    state = parallel.replicate(resume(ckpt, state, metrics_path, log, devices), mesh)
    start = int(state.step)
    loss = step_lib.LOSSES[config.loss]
    train_fn = parallel.jit_step(functools.partial(
        step_lib.train_step, model=model, tx=tx, freeze_batch_stats=freeze_batch_stats,
        loss=loss, gate_cosine=gate_cosine, graph=graph, dropout_seed=int(config.seed)), mesh)
    eval_fn = parallel.jit_step(functools.partial(step_lib.eval_step, model=model, loss=loss),
                                mesh, donate_state=False)
    held_out = functools.partial(validation_batches, config=config, mesh=mesh)
    validate = Validator(eval_fn, held_out(val_pairs if val_pairs is not None else train_pairs),
                         {name: held_out(p) for name, p in (extra_val or {}).items()})
    rows = parallel.process_rows(config.batch_size, mesh)
    hot_fraction = float(config.data.get("hot_fraction", 0.0))
    hot = data_lib.hot_voxels(train_pairs) if hot_fraction > 0 else None

    def make_batch(step: int) -> dict[str, np.ndarray]:  # host only: see data.Prefetcher
        return data_lib.sample_batch(
            train_pairs, seed=config.seed, step=step, batch_size=config.batch_size,
            patch_size=config.data.patch_size, augment=config.data.augment, rows=rows,
            hot=hot, hot_fraction=hot_fraction)

    # A resumed run hides in TensorBoard what a killed invocation wrote after its checkpoint
    # (as metrics.jsonl is cut back); a fresh start hides a failed first attempt's.
    events = EventWriter(workdir, enabled=main, purge_step=start + 1 if start else 0)
    panel = SlicePanel(model, val_pairs if val_pairs is not None else train_pairs) \
        if main else None
    logger = MetricsLogger(metrics_path, num_steps, start, log, events=events,
                           learning_rate=learning_rate_at(config, num_steps),
                           constants=constants)
    try:
        return _loop(config=config, workdir=workdir, state=state, num_steps=num_steps,
                     log=log, check=check, ckpt=ckpt, meta=meta, train_fn=train_fn,
                     validate=validate, make_batch=make_batch, logger=logger,
                     events=events, panel=panel, mesh=mesh, start=start)
    finally:
        events.close()


def _loop(*, config: ml_collections.ConfigDict, workdir: Path, state: step_lib.TrainState,
          num_steps: int, log: Callable[[str], None], check: Callable[[], None],
          ckpt: Checkpointer, meta: dict[str, Any], train_fn: Callable[..., Any],
          validate: Validator, make_batch: Callable[[int], dict[str, np.ndarray]],
          logger: MetricsLogger,
          events: EventWriter, panel: SlicePanel | None, mesh: jax.sharding.Mesh,
          start: int) -> tuple[step_lib.TrainState, dict[str, Any]]:
    """The steps of :func:`fit` from ``start``, with validations, checkpoints and the summary."""

    def show(step: int) -> None:
        if panel is not None:
            events.image(step, "val/slice_input_output_target", panel(state))

    where = lambda: (f" The last good checkpoint is step {ckpt.latest_step} in "  # noqa: E731
                     f"{workdir / 'checkpoints'}")
    if start >= num_steps:
        log(f"{workdir} already finished ({start} of {num_steps} steps)")
    if start > 0:  # a resumed run keeps the step-0 losses its first invocation recorded
        initial, initial_extra = initial_losses(workdir / METRICS_FILE)
    else:  # the starting network's validation loss: what training must improve on
        initial, initial_extra = validate(state)
        logger.validation(0, initial, initial_extra)
        show(0)
    last_val, last_extra = None, {}
    kept_steps = frozenset(int(s) for s in config.get("keep_steps", ()))
    pending: list[dict[str, jax.Array]] = []
    done = start
    # jaxlib 0.10's in-process CPU all-reduce can deadlock (XLA aborts after its
    # termination timeout) when several multi-device programs are in flight at once;
    # with one at a time it did not (benchmarks/rendezvous.py, docs/scaling.md). The wait
    # costs a dispatch per step, nothing next to a step.
    one_in_flight = mesh.devices.size > 1 and all(
        d.platform == "cpu" for d in mesh.devices.flat)
    prefetch = data_lib.Prefetcher(make_batch, start, num_steps, depth=config.data.prefetch,
                                   place=functools.partial(parallel.shard_batch, mesh=mesh))
    try:
        for step, batch in prefetch:
            state, metrics = train_fn(state, batch)
            if one_in_flight:
                jax.block_until_ready(metrics)
            pending.append(metrics)
            done = step + 1
            kept = done in kept_steps
            evaluate = done % config.eval_every == 0 or done == num_steps or kept
            if pending and (evaluate or done % config.log_every == 0):
                check()
                logger.train(done, jax.device_get(pending), first_step=done - len(pending),
                             where=where())
                pending.clear()
            if evaluate:
                last_val, last_extra = validate(state)
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
        last_val, last_extra = validate(state)
    summary = {
        "steps": int(state.step),
        "final_val_loss": last_val,
        "best_val_loss": ckpt.best_loss if math.isfinite(ckpt.best_loss) else None,
        "best_step": ckpt.best_step,
        "initial_val_loss": initial,
        "resumed_from": start if start else None,
        "wall_s_this_invocation": logger.elapsed(),
        "devices": int(mesh.devices.size),
        "global_batch": int(config.batch_size),
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
