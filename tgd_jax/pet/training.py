"""A PET training run on the generic loop: 2.5D patch batches of input/target pairs, fixed
validation batches, the slice panel, and the config's cadence, handed to
:func:`tgd_jax.train.trainer.fit`.

Batches are :func:`tgd_jax.pet.data.sample_batch` of ``(seed, step)``: with several
processes each makes only its own rows of the same global batch, so the run does not
depend on how many processes share it.
"""

from __future__ import annotations

import functools
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
from tgd_jax.pet import data as data_lib
from tgd_jax.train import parallel, trainer
from tgd_jax.train import step as step_lib
from tgd_jax.train.tensorboard import EventWriter

__all__ = ["fit_pairs", "validation_batches", "learning_rate_at", "SlicePanel", "cadence"]

Batch = dict[str, jax.Array]


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


def cadence(config: ml_collections.ConfigDict, num_steps: int) -> trainer.Cadence:
    """The loop's :class:`~tgd_jax.train.trainer.Cadence` from the config's fields."""
    return trainer.Cadence(
        num_steps=num_steps, eval_every=int(config.eval_every), log_every=int(config.log_every),
        keep_checkpoints=int(config.keep_checkpoints),
        # steps past the run's end are never reached (a length derived from num_epochs)
        keep_steps=tuple(int(s) for s in config.get("keep_steps", ()) if int(s) <= num_steps),
        prefetch=int(config.data.prefetch))


class SlicePanel:
    """A :data:`~tgd_jax.train.trainer.Hook`: at each validation, one fixed validation slice
    as ``input | output | target`` side by side, ``(H, 3 W)``, as a TensorBoard image.

    The slice is the middle one of the first pair of ``pairs`` (its 2.5D stack in, the
    network's centre channel out, as :mod:`tgd_jax.pet.denoise` uses it). The network runs
    in inference mode on this process's copy of the state (no collective).
    """

    TAG = "val/slice_input_output_target"

    def __init__(self, model: nn.Module, pairs: data_lib.PairSet) -> None:
        source, target = (pairs.volumes[i] for i in pairs.pairs[0])
        z = source.shape[0] // 2  # 1 <= z <= Z - 2: PairSet volumes have Z >= 3
        self.stack = np.moveaxis(source[z - 1:z + 2], 0, -1)[None]  # (1, H, W, 3)
        self.input, self.target = source[z], target[z]
        self._apply = jax.jit(lambda variables, x: model.apply(variables, x, train=False))

    def image(self, state: step_lib.TrainState) -> np.ndarray:
        """The ``(H, 3 W)`` panel of ``state``'s network."""
        local = parallel.host_copy({"params": state.params, "batch_stats": state.batch_stats})
        variables = {k: v for k, v in local.items() if v}
        output = np.asarray(self._apply(variables, self.stack))[0, ..., 1]
        return np.concatenate([self.input, output, self.target], axis=1)

    def __call__(self, step: int, state: step_lib.TrainState, events: EventWriter) -> None:
        events.image(step, self.TAG, self.image(state))


def fit_pairs(
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
    """Trains ``state`` on ``train_pairs`` to ``num_steps`` steps in ``workdir`` (resuming
    if it can), with :func:`tgd_jax.train.trainer.fit`.

    Args:
      config: the run's config (seed, batch_size, loss, data.*, log/eval/checkpoint cadence).
      workdir: where metrics and checkpoints go.
      model, tx: the network and the full optimizer (TGD mask included).
      state: the starting state (also the template a checkpoint is restored into).
      train_pairs, val_pairs: data; ``val_pairs=None`` validates on fixed training patches.
      num_steps: total steps of the run (not of this invocation).
      meta: extra JSON stored with every checkpoint (the config is added).
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
      constants: numbers of the run shown in TensorBoard with each validation.

    Returns:
      The final state and the run summary of :func:`~tgd_jax.train.trainer.fit` with the
      global batch size (the commands add their fields and write it to ``summary.json``).
    """
    if config.loss not in step_lib.LOSSES:
        raise UsageError(f"loss must be one of {sorted(step_lib.LOSSES)}, got {config.loss!r}")
    mesh = mesh or parallel.make_mesh()
    rows = parallel.process_rows(config.batch_size, mesh)  # the batch splits over this mesh
    loss = step_lib.LOSSES[config.loss]
    train_step = functools.partial(
        step_lib.train_step, model=model, tx=tx, freeze_batch_stats=freeze_batch_stats,
        loss=loss, gate_cosine=gate_cosine, graph=graph, dropout_seed=int(config.seed))
    eval_fn = parallel.jit_step(functools.partial(step_lib.eval_step, model=model, loss=loss),
                                mesh, donate_state=False)
    held_out = functools.partial(validation_batches, config=config, mesh=mesh)
    validate = trainer.Validator(
        eval_fn, held_out(val_pairs if val_pairs is not None else train_pairs),
        {name: held_out(p) for name, p in (extra_val or {}).items()})
    hot_fraction = float(config.data.get("hot_fraction", 0.0))
    hot = data_lib.hot_voxels(train_pairs) if hot_fraction > 0 else None

    def batches(step: int) -> dict[str, np.ndarray]:  # host only: on the prefetch thread
        return data_lib.sample_batch(
            train_pairs, seed=config.seed, step=step, batch_size=config.batch_size,
            patch_size=config.data.patch_size, augment=config.data.augment, rows=rows,
            hot=hot, hot_fraction=hot_fraction)

    main = jax.process_index() == 0
    hooks = [SlicePanel(model, val_pairs if val_pairs is not None else train_pairs)] \
        if main else []
    state, summary = trainer.fit(
        state, train_step, batches, validate, workdir, cadence(config, num_steps),
        hooks=hooks, mesh=mesh, meta={"config": config.to_dict(), **(meta or {})},
        learning_rate=learning_rate_at(config, num_steps), constants=constants, log=log)
    summary["global_batch"] = int(config.batch_size)
    return state, summary
