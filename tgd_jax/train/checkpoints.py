"""Checkpoints with orbax: the last few, the best on validation loss, and a public loader.

Layout inside a workdir::

    checkpoints/<step>/{state,meta}   the last ``keep`` checkpoints (resume from the newest)
    best/<step>/{state,meta}          the one with the lowest validation loss so far (a new
                                      best is complete before the old one is removed)
    kept/<step>/{state,meta}          checkpoints kept for good (``config.keep_steps``)

``state`` is the whole :class:`~tgd_jax.train.step.TrainState` as a state dict (params, BatchNorm
statistics, optimizer state WITH the TGD mask, gates, step); ``meta`` is JSON (the run's
config, the validation loss). Orbax writes each checkpoint under a temporary name and
renames it when complete, so a run killed mid-save leaves the previous ones intact.

Several processes write ONE checkpoint together, through orbax's multi-process protocol:
every process calls the same saves (each writes the shards its devices own; the first
process writes the metadata and finalises), so the workdir must be on a file system every
process sees. A checkpoint does not depend on how many processes or devices wrote it: each
is restored onto whatever mesh the resuming run has.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization, traverse_util

from tgd_jax.io.errors import RunError, UsageError, interrupts_deferred
from tgd_jax.train import parallel

__all__ = ["CheckpointError", "CorruptCheckpointError", "Checkpointer", "Restored", "restore",
           "load", "resolve", "check_tree_match", "peek_metadata"]

LATEST_DIR, BEST_DIR, KEPT_DIR, DAMAGED_DIR = "checkpoints", "best", "kept", "damaged"
#: Where ``best/`` can be rebuilt from (:meth:`Checkpointer.reconcile_best`), by index.
_KINDS = (LATEST_DIR, KEPT_DIR)
#: In the name of orbax's temporary folder of a checkpoint being written.
_UNFINISHED = ".orbax-checkpoint-tmp"


class CheckpointError(UsageError):
    """A checkpoint is missing or does not fit the model it is loaded into."""


class CorruptCheckpointError(CheckpointError, RunError):
    """A checkpoint's files are damaged (unreadable data or metadata)."""

    #: Read by :func:`tgd_jax.io.errors.reported`: exit without interpreter teardown.
    skip_teardown = True


def _manager(directory: Path, keep: int | None, create: bool = True
             ) -> ocp.CheckpointManager:
    # orbax's defaults copy the arrays to the host on the calling thread (its background
    # threads write host buffers only): no second thread touches the devices while the
    # steps run (see tgd_jax.train.prefetch). Options that make the copy concurrent would.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    # Handlers given up front (not just item names), so a fresh manager can read a saved
    # checkpoint's array metadata before restoring (architecture check).
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


class Checkpointer:
    """Saves and restores a run's :class:`~tgd_jax.train.step.TrainState` in ``workdir``.

    For the one run that holds ``workdir`` (:func:`tgd_jax.train.trainer.fit` locks it): it
    removes unfinished checkpoints when it starts, which another run's would look like.
    A save that fails (a full disk, here or in orbax's background thread) is a
    :class:`RunError` naming the checkpoint to resume from, with the unfinished one removed
    (with several processes, by the rerun: the others may be gone).

    With several processes every one of them makes a Checkpointer and makes the same calls;
    only the first one changes folders itself (removing or setting aside), the others wait
    for it.

    Args:
      workdir: the run's folder.
      keep: how many of the latest checkpoints to keep.
    """

    def __init__(self, workdir: str | Path, keep: int = 3, log: Callable[[str], None] = print):
        if keep < 1:
            raise UsageError(f"keep_checkpoints must be >= 1 (a run must be able to resume), "
                             f"got {keep}")
        self.workdir = Path(workdir).absolute()  # orbax needs absolute paths
        self.log = log
        self.discard_unfinished()  # a killed run's half-written checkpoints
        self._latest = _manager(self.workdir / LATEST_DIR, keep)
        self._best = _manager(self.workdir / BEST_DIR, 1)
        self._kept: ocp.CheckpointManager | None = None  # made by the first save(kept=True)
        best_step = self._first_says(self._best.latest_step())
        self.best_loss = float("inf")
        if best_step is not None:
            read = self._agreed_read(BEST_DIR, best_step,
                                     lambda: self._restore_meta(self._best, best_step))
            if read is not None:
                self.best_loss = float(read["val_loss"])

    @property
    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    @property
    def best_step(self) -> int | None:
        return self._best.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any],
             val_loss: float | None = None, kept: bool = False) -> bool:
        """Saves ``state`` at ``step`` (and as the best when ``val_loss`` improves).

        ``kept``: also keep this one for good in ``kept/<step>`` (never rotated out).
        Returns whether it became the best.
        """
        with interrupts_deferred():  # a Ctrl-C lands after orbax has the whole checkpoint
            return self._writing(step, lambda: self._save(step, state, meta, val_loss, kept))

    def _writing(self, step: int | None, write: Callable[[], Any]) -> Any:
        """``write()``; a failure (here, or of an earlier save finishing in the background)
        becomes one :class:`RunError` naming what is kept."""
        try:
            return write()
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - orbax/tensorstore/OS errors alike
            first = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), "")
            if jax.process_count() > 1:  # waiting or removing would need the others
                raise RunError(
                    f"process {jax.process_index()} of {jax.process_count()}: writing a "
                    "checkpoint failed" + (f" at step {step}" if step is not None else "")
                    + f" ({type(error).__name__}: {first[:200]}); if another process of this "
                    "run stopped, that is the cause (see its output). Rerun every process to "
                    f"resume from the newest complete checkpoint in {self.workdir}") from error
            for manager in self._managers():  # let the other writes end before removing
                with contextlib.suppress(Exception):
                    manager.wait_until_finished()
            self.discard_unfinished()
            latest = self._latest.latest_step()
            raise RunError(
                f"{self.workdir}: writing a checkpoint failed"
                + (f" at step {step}" if step is not None else "")
                + f" ({type(error).__name__}: {first[:200]}); the unfinished one was removed; "
                + (f"rerun the same command to resume from step {latest}" if latest is not None
                   else "no complete checkpoint yet, a rerun starts over")) from error

    def _save(self, step: int, state: Any, meta: Mapping[str, Any],
              val_loss: float | None, kept: bool) -> bool:
        meta = {**meta, "step": int(step), "val_loss": val_loss}
        args = ocp.args.Composite(state=ocp.args.StandardSave(serialization.to_state_dict(state)),
                                  meta=ocp.args.JsonSave(meta))
        self._one_at_a_time()
        self._latest.save(step, args=args, force=True)
        if kept:
            if self._kept is None:
                self._kept = _manager(self.workdir / KEPT_DIR, None)
            if step not in self._kept.all_steps():  # a resumed run may pass it again
                self._one_at_a_time()
                self._kept.save(step, args=args, force=True)
        improved = val_loss is not None and val_loss < self.best_loss
        if improved and step in self._best.all_steps():
            # best/ holds this very step from before a resume (kept by reconcile_best); the
            # recomputation can differ in the last bits (another device count): keep it
            self.best_loss = float(val_loss)
            return improved
        if improved:
            self.best_loss = float(val_loss)
            self._one_at_a_time()
            # max_to_keep=1: orbax finalises the new best, THEN removes the old one, so a
            # kill at any moment leaves one complete best. Waiting here reports a failed
            # write (a full disk) at this step, not at the next save.
            self._best.save(step, args=args, force=True)
            self._best.wait_until_finished()
        return improved

    def reconcile_best(self, metrics_file: Path, resumed_step: int,
                       log: Callable[[str], None] | None = None) -> None:
        """Makes ``best/`` hold the best validation recorded up to ``resumed_step``.

        ``metrics_file``: the run's ``metrics.jsonl``, already cut back to the resumed step
        (by the first process). A ``best/`` that is missing, incomplete or holds another
        step (a run killed or a disk full while writing it) is rebuilt from the kept
        checkpoint of that step (a copy, made complete before it replaces anything); a best
        at a step after ``resumed_step`` (written before the kill, which the rerun
        recomputes identically) is kept. When no kept checkpoint has that step, or the
        copy fails (a full disk), ``best/`` stays as it is and one line says so. With
        several processes, process 0 decides and copies; every process then reads the
        rebuilt best's loss from its files.
        """
        log = log or self.log
        _sync("tgd_reconcile_best")  # the first process has cut metrics.jsonl back
        # Process 0 decides from its reading of the folder and tells the others.
        decision = self._best_to_rebuild(metrics_file, resumed_step, log) if (
            jax.process_index() == 0) else [-1, -1]
        step, kind = parallel.broadcast_from_first(decision)
        if step < 0:
            return
        source = self.workdir / _KINDS[kind] / str(step)
        target = self.workdir / BEST_DIR / str(step)
        have = self._best.latest_step()
        done = 1
        if jax.process_index() == 0:
            partial = target.with_name(f"{step}.rebuilding")
            try:
                shutil.rmtree(partial, ignore_errors=True)
                shutil.copytree(source, partial)
                shutil.rmtree(target, ignore_errors=True)
                partial.rename(target)  # complete before the old best goes
            except OSError as error:  # a full disk: best/ stays as it was
                shutil.rmtree(partial, ignore_errors=True)
                done = 0
                log(f"warning: could not rebuild {target} from {source} ({error}); best/ "
                    "stays as it was and the best from here on is saved as usual")
            else:
                for old in (self.workdir / BEST_DIR).iterdir():
                    if old.name != str(step):
                        shutil.rmtree(old, ignore_errors=True)
        if not parallel.broadcast_from_first([done])[0]:
            return
        self._best.reload()
        self.best_loss = float(self._restore_meta(self._best, step)["val_loss"])
        log(f"rebuilt {target} from {source} (the best validation recorded, loss "
            f"{self.best_loss:.6g}; " + (f"best/ held step {have})" if have is not None
                                         else "best/ was empty)"))

    def _best_to_rebuild(self, metrics_file: Path, resumed_step: int,
                         log: Callable[[str], None]) -> list[int]:
        """``[step, kind]``: the kept checkpoint (``_KINDS[kind]/step``) that ``best/``
        must be rebuilt from, or ``[-1, -1]``: nothing to do (or nothing it can be rebuilt
        from, said in one line)."""
        from tgd_jax.train.metrics import read_metrics

        records = read_metrics(metrics_file, log=lambda _: None)  # truncation said it
        vals = [(float(r["val_loss"]), int(r["step"])) for r in records
                if "val_loss" in r and 0 < int(r["step"]) <= resumed_step]
        if not vals:
            return [-1, -1]
        loss, step = min(vals)  # ties: the earliest, as the strict `<` of save() chose
        have = self._best.latest_step()
        if have == step or (have is not None and (have > resumed_step
                                                  or self.best_loss <= loss)):
            # best/ holds the recorded best, one the rerun recomputes, or one at least as
            # good as any record left (a torn metrics.jsonl may have lost the newest)
            return [-1, -1]
        for kind, manager in enumerate((self._latest, self._kept_manager())):
            if manager is not None and step in manager.all_steps():
                return [step, kind]
        log(f"warning: {self.workdir / BEST_DIR} should hold step {step} (the best "
            f"validation recorded, loss {loss:.6g}) but "
            + (f"holds step {have}" if have is not None else "is empty")
            + " and no kept checkpoint has that step: it cannot be rebuilt; "
            "the best from here on is saved as usual")
        return [-1, -1]

    def _kept_manager(self) -> ocp.CheckpointManager | None:
        if self._kept is None and (self.workdir / KEPT_DIR).is_dir():
            self._kept = _manager(self.workdir / KEPT_DIR, None)
        return self._kept

    def _one_at_a_time(self) -> None:
        """With several processes, lets every save in flight finish before the next starts.

        Each save of orbax runs cross-process barriers in a background thread, named after a
        process-wide operation counter; two managers saving at once (``latest`` and ``best``
        at the same step) met in one barrier and failed ("Barrier
        ThreadSaveMultiHostValueHolder:set_value_start is already ongoing"), and orbax warns
        that its barriers must not run concurrently. One process has no barriers: its saves
        still overlap."""
        if jax.process_count() > 1:
            for manager in self._managers():
                manager.wait_until_finished()

    def restore_latest(self, template: Any, log: Callable[[str], None] = print
                       ) -> tuple[Any, dict[str, Any]] | None:
        """The newest INTACT checkpoint restored into ``template``'s structure (None if none).

        A damaged checkpoint (unreadable data or metadata) is skipped, with a line in
        ``log`` saying which and why, and the next older one is tried; a run killed while
        writing its newest checkpoint thus resumes from the one before. A checkpoint that
        reads but does not fit ``template`` is an error, not skipped.

        Raises:
          CorruptCheckpointError: if every checkpoint is damaged.
          CheckpointError: if one does not fit ``template``.
        """
        skipped: list[int] = []
        while (step := self._first_says(max(set(self._latest.all_steps()) - set(skipped),
                                            default=None))) is not None:
            restored = self._agreed_read(LATEST_DIR, step, lambda: restore_into(
                self._latest, step, template, self.workdir / LATEST_DIR), log)
            if restored is not None:
                return restored
            skipped.append(step)
        if skipped:
            raise CorruptCheckpointError(f"{self.workdir / LATEST_DIR}: every checkpoint is "
                                         f"damaged (steps {sorted(skipped)}); delete the folder "
                                         "to start over")
        return None

    @staticmethod
    def _first_says(step: int | None) -> int | None:
        """Process 0's ``step`` on every process (None: none): the processes act on one
        listing of the shared folder, never each on its own."""
        said = parallel.broadcast_from_first([-1 if step is None else int(step)])[0]
        return None if said < 0 else said

    def _agreed_read(self, kind: str, step: int, read: Callable[[], Any],
                     log: Callable[[str], None] | None = None) -> Any:
        """``read()`` of checkpoint ``kind/step`` on every process, and what they agree on.

        Returns what this process read, or None when the checkpoint is damaged as read by
        ANY process: then every process has set it aside together (no process still
        reading it when it moves, none resuming from a step another skipped).

        The processes first agree on the checkpoint's metadata, which each reads alone;
        orbax's restore (``read``) then runs collectives of its own, so a process must not
        skip it while the others go in. Data that only one process fails to read DURING
        the restore is agreed on after it, as long as that process reaches the end of it.

        Raises:
          RunError: a process does not see a checkpoint process 0 sees (a folder not
            shared alike by every process).
        """
        folder = self.workdir / kind / str(step)
        manager = self._best if kind == BEST_DIR else self._latest
        status, error = _READ_OK, None
        if not folder.is_dir():
            status = _READ_MISSING
        else:
            try:
                peek_metadata(manager, step, folder)
            except CorruptCheckpointError as e:
                status, error = _READ_DAMAGED, e
        if self._agree(folder, status, error, manager, kind, step, log):
            out, status = None, _READ_OK
            try:
                out = _guarded(folder, read)  # whatever orbax or JSON raises: damage
            except CorruptCheckpointError as e:
                status, error = _READ_DAMAGED, e
            if self._agree(folder, status, error, manager, kind, step, log):
                return out
        return None

    def _agree(self, folder: Path, status: int, error: Exception | None,
               manager: ocp.CheckpointManager, kind: str, step: int,
               log: Callable[[str], None] | None) -> bool:
        """Whether every process read ``folder`` fine; if not, it is set aside by all."""
        statuses = parallel.gather_from_processes(status)
        if _READ_MISSING in statuses:
            raise RunError(
                f"{folder}: process {statuses.index(_READ_MISSING)} of {len(statuses)} does "
                "not see this checkpoint, which process 0 does: every process must see the "
                "workdir alike (one shared file system, no stale network cache)")
        if _READ_DAMAGED not in statuses:
            return True
        if error is not None and jax.process_index() > 0:  # only process 0 logs
            print(f"process {jax.process_index()}: {error}", file=sys.stderr, flush=True)
        if error is None:  # this process read it fine: another did not
            error = CorruptCheckpointError(
                f"{folder}: unreadable by process {statuses.index(_READ_DAMAGED)} of "
                f"{len(statuses)} (see its output)")
        self._set_aside(manager, kind, step, error, log)
        return False

    def _set_aside(self, manager: ocp.CheckpointManager, kind: str, step: int,
                   error: Exception, log: Callable[[str], None] | None = None) -> None:
        """Moves a damaged checkpoint to ``<workdir>/damaged/`` (kept for inspection, out of
        the way of the step that will be written again) and says so."""
        source = self.workdir / kind / str(step)
        target = self.workdir / DAMAGED_DIR / f"{kind}-{step}"
        _sync(f"tgd_stop_reading_{kind}_{step}")  # no process still reads it when it moves
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            source.rename(target)
        _sync(f"tgd_set_aside_{kind}_{step}")
        manager.reload()
        (log or self.log)(f"skipped damaged checkpoint {error}; moved it to {target}")

    def _managers(self) -> list[ocp.CheckpointManager]:
        return [m for m in (self._latest, self._best, self._kept) if m is not None]

    def wait(self) -> None:
        """Waits for the checkpoints being written (:class:`RunError` if one failed)."""
        with interrupts_deferred():  # a checkpoint being written is finished first
            for manager in self._managers():
                self._writing(None, manager.wait_until_finished)

    def close(self) -> None:
        """Finishes the checkpoints being written and closes (:class:`RunError` as ``wait``)."""
        with interrupts_deferred():
            for manager in self._managers():
                self._writing(None, manager.close)

    def discard_unfinished(self) -> None:
        """Removes orbax's temporary folders of checkpoints that were never completed (a
        failed or killed save). Only for the run that holds the workdir: another's save in
        progress looks the same. The first process removes them, the others wait."""
        if jax.process_index() == 0:
            for kind in (LATEST_DIR, BEST_DIR, KEPT_DIR):
                for path in (self.workdir / kind).glob(f"*{_UNFINISHED}*"):
                    shutil.rmtree(path, ignore_errors=True)
                for path in (self.workdir / kind).glob("*.rebuilding"):  # reconcile_best's
                    shutil.rmtree(path, ignore_errors=True)
        _sync("tgd_discard_unfinished")

    @staticmethod
    def _restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


_BARRIERS = itertools.count()
#: What a process saw of a checkpoint (:meth:`Checkpointer._agreed_read`).
_READ_OK, _READ_DAMAGED, _READ_MISSING = 0, 1, 2


def _sync(name: str) -> None:
    """A barrier of every process of a multi-process run (nothing with one process). Every
    process makes the same calls in the same order, so the numbered names agree."""
    parallel.barrier(f"{name}_{next(_BARRIERS)}", timeout_s=600)


def peek_metadata(manager: ocp.CheckpointManager, step: int, folder: Path) -> Any:
    """Checkpoint ``step``'s metadata, read by this process alone (no collective).

    Raises:
      CorruptCheckpointError: it is unreadable.
    """
    return _guarded(folder, lambda: manager.item_metadata(step))


def restore_into(manager: ocp.CheckpointManager, step: int, template: Any,
                 where: Path) -> tuple[Any, dict[str, Any]]:
    """Restores step ``step`` with ``template``'s structure, shapes, dtypes and shardings."""
    target = serialization.to_state_dict(template)
    folder = Path(where) / str(step)
    metadata = peek_metadata(manager, step, folder)["state"]
    saved = metadata.tree if hasattr(metadata, "tree") else metadata
    check_tree_match(target, saved, str(folder))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = _guarded(folder, lambda: manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())))
    _check_finite_state(restored["state"], folder)
    return serialization.from_state_dict(template, restored["state"]), restored["meta"]


def _guarded(folder: Path, read: Callable[[], Any]) -> Any:
    """``read()``, with any failure of orbax/tensorstore/JSON reported as one line."""
    _quiet_abandoned_reads()
    try:
        out = read()
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever the storage layer raises
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        raise CorruptCheckpointError(
            f"{folder}: unreadable ({type(error).__name__}: {first[:200]})") from error
    if out is None:
        raise CorruptCheckpointError(f"{folder}: unreadable (no metadata)")
    return out


def _quiet_abandoned_reads() -> None:
    """Drops the "Event loop is closed" reports of reads abandoned by a failed restore.

    When one array of a checkpoint fails to read, orbax ends its event loop while
    tensorstore still completes the other reads; their callbacks then find the loop closed
    and Python reports each through ``sys.unraisablehook`` as a traceback, after the one-line
    error. Their results are discarded anyway, so exactly these reports are dropped
    (everything else goes to the previous hook). Installed once per process.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_tgd_quiet", False):
        return

    def hook(report: Any) -> None:
        value = report.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(report)

    hook._tgd_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _check_finite_state(state: Any, folder: Path) -> None:
    """Checkpoints are only written for finite losses: non-finite params mean damage."""
    for path, leaf in traverse_util.flatten_dict(_to_dict(state.get("params", {})),
                                                 sep="/").items():
        if hasattr(leaf, "dtype") and np.issubdtype(np.asarray(leaf).dtype, np.floating) and (
                not np.all(np.isfinite(np.asarray(leaf)))):
            raise CorruptCheckpointError(f"{folder}: parameter '{path}' holds non-finite "
                                         "values")


def _check_real_params(params: Any, folder: Path) -> None:
    """A network's parameters are real floating-point arrays; anything else is not one."""
    for path, leaf in _flat(params).items():
        dtype = np.dtype(leaf.dtype)
        if not jax.numpy.issubdtype(dtype, jax.numpy.floating):  # bfloat16 included
            raise CheckpointError(f"{folder}: parameter '{path}' has dtype {dtype}, expected "
                                  "real floating point; not a network checkpoint")


def check_tree_match(expected: Any, saved: Any, where: str) -> None:
    """Raises :class:`CheckpointError` naming the first leaf whose path, shape or dtype differ.

    ``expected`` holds arrays (or shape/dtype structs), ``saved`` the checkpoint's array
    metadata (anything with ``shape`` and ``dtype``).
    """
    flat_e = _flat(expected)
    flat_s = _flat(saved)
    for path in sorted(set(flat_e) | set(flat_s)):
        if path not in flat_s:
            raise CheckpointError(f"{where}: the model has '{path}' (shape "
                                  f"{tuple(flat_e[path].shape)}) but the checkpoint does not; "
                                  "was it written by a different architecture or method?")
        if path not in flat_e:
            raise CheckpointError(f"{where}: the checkpoint has '{path}' (shape "
                                  f"{tuple(flat_s[path].shape)}) but the model does not; "
                                  "was it written by a different architecture or method?")
        e, s = flat_e[path], flat_s[path]
        if tuple(e.shape) != tuple(s.shape):
            raise CheckpointError(f"{where}: '{path}' has shape {tuple(s.shape)} in the "
                                  f"checkpoint but {tuple(e.shape)} in the model "
                                  "(a different architecture?)")
        if np.dtype(e.dtype) != np.dtype(s.dtype):
            raise CheckpointError(f"{where}: '{path}' has dtype {np.dtype(s.dtype)} in the "
                                  f"checkpoint but {np.dtype(e.dtype)} in the model")


def _flat(tree: Any) -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        return {"": tree}
    flat = traverse_util.flatten_dict(_to_dict(tree), sep="/")
    return {k: v for k, v in flat.items() if v is not None and hasattr(v, "shape")}


def _to_dict(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _to_dict(v) for k, v in tree.items()}
    return tree


def resolve(path: str | Path, which: str = "best") -> tuple[Path, int]:
    """The manager folder and step for ``path``: a workdir, a ``checkpoints``/``best`` folder,
    or one checkpoint's folder (``.../checkpoints/400``, which ignores ``which``).

    ``which``: ``"best"`` (falls back to the latest when no best exists), ``"latest"``, or a
    step number.
    """
    path = Path(path)
    try:
        path.stat()
    except OSError as e:  # missing, a symlink loop, no permission: say which
        raise CheckpointError(f"{path}: no such workdir or checkpoint folder"
                              if isinstance(e, FileNotFoundError) else
                              f"{path}: cannot open ({e.strerror})") from None
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file; give a workdir or a checkpoint folder")
    if path.name.isdigit() and (path / "state").is_dir():  # one checkpoint: <folder>/<step>
        return path.parent, int(path.name)
    if (path / LATEST_DIR).is_dir() or (path / BEST_DIR).is_dir():
        candidates = [path / BEST_DIR, path / LATEST_DIR] if which == "best" else [
            path / LATEST_DIR]
    else:
        candidates = [path]
    for folder in candidates:
        if not folder.is_dir():
            continue
        steps = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
        if not steps:
            continue
        if which in ("best", "latest"):
            return folder, steps[-1]
        if not str(which).isdigit() or int(which) not in steps:
            raise CheckpointError(f"{folder}: no checkpoint at step {which} (have {steps})")
        return folder, int(which)
    raise CheckpointError(f"{path}: no checkpoints found (looked in "
                          f"{', '.join(str(c) for c in candidates)})")


class Restored(NamedTuple):
    """A trained network as :func:`restore` returns it."""

    params: Any  #: the ``params`` collection (NumPy arrays)
    batch_stats: Any  #: the ``batch_stats`` collection (``{}`` without BatchNorm)
    config: ml_collections.ConfigDict  #: the config of the run that wrote it
    meta: dict[str, Any]  #: ``step``, ``val_loss``, ``checkpoint`` (its folder), ...


def restore(path: str | Path, which: str = "best") -> Restored:
    """A trained network, its run's config and the checkpoint's metadata.

    Args:
      path: a run's workdir, its ``checkpoints`` / ``best`` folder, or one checkpoint.
      which: ``"best"`` (lowest validation loss; the latest if none), ``"latest"``, or a step.
    """
    folder, step = resolve(Path(path).absolute(), which)
    manager = _manager(folder, keep=1_000_000, create=False)
    try:
        # Onto this process's first device, whatever mesh wrote it (a run on 2 CPU devices
        # saves shardings that a 1-device process could not otherwise restore).
        where = folder / str(step)
        metadata = _guarded(where, lambda: manager.item_metadata(step)["state"])
        saved = metadata.tree if hasattr(metadata, "tree") else metadata
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
            if hasattr(m, "shape") else m, saved)
        restored = _guarded(where, lambda: manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())))
    finally:
        manager.close()
    state, meta = restored["state"], restored["meta"]
    if not isinstance(meta, Mapping) or not isinstance(meta.get("config", {}), Mapping):
        raise CorruptCheckpointError(f"{where}: its metadata is not a JSON object with a "
                                     "'config' object")
    meta = dict(meta)
    if not isinstance(state, Mapping) or "params" not in state:
        raise CheckpointError(f"{folder}/{step}: no 'params' in the checkpoint's state")
    _check_real_params(state["params"], where)
    _check_finite_state(state, where)
    to_numpy = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
    meta["checkpoint"] = str(folder / str(step))
    config = ml_collections.ConfigDict(meta.get("config", {}))
    return Restored(to_numpy(state["params"]), to_numpy(state.get("batch_stats") or {}),
                    config, meta)


def load(path: str | Path, which: str = "best") -> tuple[Any, Any, ml_collections.ConfigDict]:
    """``(params, batch_stats, config)`` of a trained network, for scripts and notebooks.

    ``path`` and ``which`` as in :func:`restore` (which also returns the metadata)::

        params, batch_stats, config = tgd_jax.train.checkpoints.load("runs/tgdnet")
        model = tgd_jax.pet.models.model_from_config(config.model)
        out = model.apply({"params": params, "batch_stats": batch_stats}, x)
    """
    params, batch_stats, config, _ = restore(path, which)
    return params, batch_stats, config
