"""The training loop shared by every command: data-parallel steps, metrics, checkpoints, resume.

:func:`fit` runs ``train_step`` from the state's step to ``num_steps``:

* batches are :func:`tgd_jax.data.sample_batch` of ``(seed, step)``, prefetched on a thread
  and sharded over a 1-D ``('data',)`` mesh of all devices (:mod:`tgd_jax.parallel`);
* every ``log_every`` steps a JSON line goes to ``metrics.jsonl`` and a progress line
  (loss, steps/s, ETA) to the log; a non-finite loss stops the run there
  (:class:`NonFiniteLossError`), before any checkpoint of a diverged state is written;
* every ``eval_every`` steps (and at the end) the validation loss is measured and a
  checkpoint saved (the last few kept, plus the best);
* if ``workdir`` already holds checkpoints, the newest is restored first, so rerunning a
  killed command finishes with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from tgd_jax import data as data_lib
from tgd_jax import optim, parallel
from tgd_jax import step as step_lib
from tgd_jax import workdir as workdir_lib
from tgd_jax.checkpoints import Checkpointer

__all__ = ["NonFiniteLossError", "make_optimizer", "fit", "prepare_workdir", "config_diff"]

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(FloatingPointError):
    """The training or validation loss became NaN or infinite."""


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int
                   ) -> optax.GradientTransformation:
    """The inner optimizer of ``config.optimizer`` (TGD's mask is chained AFTER it)."""
    o = config.optimizer
    if o.learning_rate <= 0:
        raise ValueError(f"optimizer.learning_rate must be > 0, got {o.learning_rate}")
    if o.schedule == "constant":
        lr: Any = o.learning_rate
    elif o.schedule == "cosine":
        lr = optax.cosine_decay_schedule(o.learning_rate, max(1, num_steps))
    else:
        raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {o.schedule!r}")
    if o.name == "adam":
        inner = optax.adam(lr)
    elif o.name == "adamw":
        inner = optax.adamw(lr, weight_decay=o.weight_decay)
    elif o.name == "sgd":
        inner = optax.sgd(lr, momentum=o.momentum or None)
    else:
        raise ValueError(f"optimizer.name must be adam, adamw or sgd, got {o.name!r}")
    if o.grad_clip > 0:
        inner = optax.chain(optax.clip_by_global_norm(o.grad_clip), inner)
    if o.l2 != 0:  # coupled: a loss term, so its gradient is clipped and normalised too
        inner = optax.chain(optim.kernel_l2(o.l2), inner)
    return inner


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> str | None:
    """The first differing key of two nested config dicts, as ``'a.b: old -> new'``."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found = config_diff(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif _jsonable(a) != _jsonable(b):
            return f"{prefix}{key}: {a!r} -> {b!r}"
    return None


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def prepare_workdir(workdir: str | Path, config: ml_collections.ConfigDict,
                    command: str) -> Path:
    """Creates ``workdir`` and writes ``config.json`` and ``versions.json``.

    A workdir whose checkpoints come from a DIFFERENT config is refused (they would be
    resumed into the wrong experiment); the same config resumes. A workdir without
    checkpoints (a run that failed before its first one) is simply reused.
    """
    workdir = Path(workdir)
    saved = workdir / "config.json"
    new = {"command": command, "config": config.to_dict()}
    has_checkpoints = any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*"))
    if saved.exists() and has_checkpoints:
        old = json.loads(saved.read_text())
        diff = config_diff(_jsonable(old), _jsonable(new))
        if diff:
            raise ValueError(f"{workdir} holds a run with a different config ({diff}); "
                             "use a new --workdir, or delete it to start over")
    if jax.process_index() == 0:
        workdir_lib.write_json(saved, new)
        workdir_lib.write_json(workdir / "versions.json", workdir_lib.versions())
    return workdir


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drops records past ``last_step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    workdir_lib.atomic_write_bytes(path, "".join(f"{line}\n" for line in keep).encode())


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
        (:func:`tgd_jax.step.train_step`).

    Returns:
      The final state and the run summary (the commands add their fields and write it
      to ``summary.json``).

    Raises:
      NonFiniteLossError: at the first step whose loss is not finite; the checkpoints
        written before it are kept.
    """
    if config.loss not in step_lib.LOSSES:
        raise ValueError(f"loss must be one of {sorted(step_lib.LOSSES)}, got {config.loss!r}")
    workdir = Path(workdir)
    main = jax.process_index() == 0  # on several hosts only the first one writes files
    if not main:
        log = _silent
    mesh = mesh or parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    local_batch = parallel.local_batch_size(config.batch_size, mesh)
    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
    meta = {"config": config.to_dict(), **(meta or {})}
    metrics_path = workdir / METRICS_FILE

    restored = ckpt.restore_latest(state)
    if restored is not None:
        state = restored[0]
        log(f"resuming from {workdir / 'checkpoints'} at step {int(state.step)}")
        if main:
            _truncate_metrics(metrics_path, int(state.step))
    elif main:
        _truncate_metrics(metrics_path, -1)
    state = parallel.replicate(state, mesh)
    start = int(state.step)

    loss = step_lib.LOSSES[config.loss]
    train_fn = parallel.jit_step(functools.partial(
        step_lib.train_step, model=model, tx=tx, freeze_batch_stats=freeze_batch_stats,
        loss=loss, gate_cosine=gate_cosine), mesh)
    eval_fn = parallel.jit_step(functools.partial(step_lib.eval_step, model=model, loss=loss),
                                mesh, donate_state=False)
    sample = functools.partial(
        data_lib.sample_batch, seed=config.seed, batch_size=local_batch,
        patch_size=config.data.patch_size, process_index=jax.process_index())
    val_source = val_pairs if val_pairs is not None else train_pairs
    def fixed_batches(pairs: data_lib.PairSet) -> list[dict[str, jax.Array]]:
        return [parallel.shard_batch(sample(pairs, step=i, augment=False,
                                            stream=data_lib.STREAM_VAL), mesh)
                for i in range(config.eval_batches)]

    val_batches = fixed_batches(val_source)
    extra_batches = {name: fixed_batches(p) for name, p in (extra_val or {}).items()}

    def validate(batches: list[dict[str, jax.Array]] | None = None) -> float:
        return float(np.mean([float(eval_fn(state, b)["loss"])
                              for b in (val_batches if batches is None else batches)]))

    def validate_extra() -> dict[str, float]:
        return {f"val_loss_{name}": validate(b) for name, b in extra_batches.items()}

    def make_batch(step: int) -> dict[str, jax.Array]:
        return parallel.shard_batch(sample(train_pairs, step=step, augment=config.data.augment),
                                    mesh)

    pending: list[tuple[int, dict[str, jax.Array]]] = []
    t_start = t_last = time.perf_counter()
    steps_at_last = start
    last_val: float | None = None
    last_extra: dict[str, float] = {}

    def flush(step: int) -> None:
        nonlocal t_last, steps_at_last
        if not pending:
            return
        values = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, values, strict=True):
            if not math.isfinite(float(m["loss"])):
                raise NonFiniteLossError(
                    f"training loss is {float(m['loss'])} at step {s + 1}; stopped. The last "
                    f"good checkpoint is step {ckpt.latest_step} in {workdir / 'checkpoints'}")
        now = time.perf_counter()
        rate = (step - steps_at_last) / max(now - t_last, 1e-9)
        losses = [float(m["loss"]) for m in values]
        record = {"step": step, "loss": float(np.mean(losses)), "loss_last": losses[-1],
                  "grad_norm": float(values[-1]["grad_norm"]), "steps_per_s": rate,
                  "elapsed_s": now - t_start, "eta_s": (num_steps - step) / max(rate, 1e-9)}
        if "gate_cosine" in values[-1]:  # mean over the steps since the last record
            record["gate_cosine"] = float(np.mean([float(m["gate_cosine"]) for m in values]))
        if main:
            workdir_lib.append_jsonl(metrics_path, record)
        log(f"step {step}/{num_steps}  loss {record['loss']:.5g}  {rate:.2f} steps/s  "
            f"ETA {_hms(record['eta_s'])}")
        pending.clear()
        t_last, steps_at_last = now, step

    def evaluate_and_save(step: int) -> None:
        nonlocal last_val, last_extra
        val = validate()
        last_extra = validate_extra()
        if not math.isfinite(val):
            raise NonFiniteLossError(
                f"validation loss is {val} at step {step}; stopped. The last good checkpoint "
                f"is step {ckpt.latest_step} in {workdir / 'checkpoints'}")
        best = ckpt.save(step, state, meta, val_loss=val)
        if main:
            workdir_lib.append_jsonl(metrics_path, {"step": step, "val_loss": val,
                                                    "best": best, **last_extra})
        extra = "".join(f"  {k} {v:.5g}" for k, v in last_extra.items())
        log(f"step {step}/{num_steps}  validation loss {val:.5g}{'  (best)' if best else ''}"
            f"{extra}")
        last_val = val

    if start >= num_steps:
        log(f"{workdir} already finished ({start} of {num_steps} steps)")
    initial: float | None = None
    initial_extra: dict[str, float] = {}
    if start > 0:  # a resumed run keeps the step-0 losses its first invocation recorded
        initial, initial_extra = _initial_losses(metrics_path)
    else:  # the starting network's validation loss: what training must improve on
        initial, initial_extra = validate(), validate_extra()
        if main:
            workdir_lib.append_jsonl(metrics_path, {"step": 0, "val_loss": initial,
                                                    **initial_extra})
        extra = "".join(f"  {k} {v:.5g}" for k, v in initial_extra.items())
        log(f"step 0/{num_steps}  validation loss {initial:.5g} (before training){extra}")
    prefetch = data_lib.Prefetcher(make_batch, start, num_steps, depth=config.data.prefetch)
    try:
        for step, batch in prefetch:
            state, metrics = train_fn(state, batch)
            pending.append((step, metrics))
            done = step + 1
            if done % config.log_every == 0 or done == num_steps:
                flush(done)
            if done % config.eval_every == 0 or done == num_steps:
                flush(done)
                evaluate_and_save(done)
    finally:
        prefetch.close()
        ckpt.wait()
    if start >= num_steps and last_val is None:
        last_val, last_extra = validate(), validate_extra()
    summary = {
        "steps": int(state.step),
        "final_val_loss": last_val,
        "best_val_loss": ckpt.best_loss if math.isfinite(ckpt.best_loss) else None,
        "best_step": ckpt.best_step,
        "initial_val_loss": initial,
        "resumed_from": start if start else None,
        "wall_s_this_invocation": time.perf_counter() - t_start,
        "devices": int(mesh.devices.size),
        "global_batch": int(config.batch_size),
        **{f"initial_{k}": v for k, v in initial_extra.items()},
        **{f"final_{k}": v for k, v in last_extra.items()},
    }
    ckpt.close()
    return state, summary


def _initial_losses(path: Path) -> tuple[float | None, dict[str, float]]:
    """The step-0 validation losses recorded in ``metrics.jsonl`` (None, {} if absent)."""
    if not path.exists():
        return None, {}
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("step") == 0 and "val_loss" in record:
            return record["val_loss"], {k: v for k, v in record.items()
                                        if k.startswith("val_loss_")}
    return None, {}


def _silent(message: str) -> None:
    del message


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
