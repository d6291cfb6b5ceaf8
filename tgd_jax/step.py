"""Pure training and evaluation steps for (TGD-)training a Flax denoiser.

``train_step``/``eval_step`` are plain functions of ``(state, batch)``; bind the model and
optimizer with ``functools.partial`` and ``jax.jit`` them (data-parallel sharding is added
around them by the training loop, not in here).

The TGD pieces meet here: the gate collection travels in the state and is passed to the
model ("paper" mode), the optax mask lives in ``opt_state`` (see :mod:`tgd_jax.optim`), and
the BatchNorm running statistics of frozen channels are kept unchanged
(``freeze_batch_stats=True``, the default) using that same mask.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from tgd_jax import masks as masks_lib
from tgd_jax.gate import GATE_COLLECTION
from tgd_jax.optim import find_mask

__all__ = ["TrainState", "create_train_state", "train_step", "eval_step", "mse", "mae",
           "LOSSES"]

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes.

    Attributes:
      step: scalar int32 step counter.
      params: the ``params`` collection.
      batch_stats: the ``batch_stats`` collection (``{}`` for models without BatchNorm).
      opt_state: optimizer state; with :func:`tgd_jax.optim.tgd` it holds the TGD mask.
      gates: the ``"tgd"`` gate collection (``{}``: no gates, plain back-propagation).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    gates: Any


def create_train_state(
    variables: dict[str, Any], tx: optax.GradientTransformation, gates: Any = None
) -> TrainState:
    """A fresh state from model variables (``params``, optional ``batch_stats``)."""
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        gates={} if gates is None else gates,
    )


def mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over all elements (the paper's loss)."""
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))


def mae(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute error over all elements (an L1 alternative)."""
    return jnp.mean(jnp.abs(prediction.astype(jnp.float32) - target.astype(jnp.float32)))


#: Losses selectable by name (``config.loss``).
LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {"mse": mse, "mae": mae}


def _variables(state: TrainState, params: Any) -> dict[str, Any]:
    variables = {"params": params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    if state.gates:
        variables[GATE_COLLECTION] = state.gates
    return variables


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    freeze_batch_stats: bool = True,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = mse,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on ``batch = {"inputs": (B,H,W,C), "targets": (B,H,W,C)}``.

    Returns the new state and ``{"loss": scalar, "grad_norm": scalar}``.
    """

    def loss_fn(params: Any) -> tuple[jax.Array, Any]:
        prediction, updates = model.apply(
            _variables(state, params), batch["inputs"], train=True, mutable=["batch_stats"]
        )
        return loss(prediction, batch["targets"]), updates.get("batch_stats", {})

    (value, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    mask = find_mask(opt_state)
    if freeze_batch_stats and mask is not None and new_stats:
        new_stats = masks_lib.freeze_batch_stats(state.batch_stats, new_stats, mask)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
    )
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    return new_state, {"loss": value, "grad_norm": grad_norm}


def eval_step(state: TrainState, batch: Batch, *, model: nn.Module,
              loss: Callable[[jax.Array, jax.Array], jax.Array] = mse) -> dict[str, jax.Array]:
    """Inference-mode loss (running BatchNorm statistics): ``{"loss": scalar}``."""
    prediction = model.apply(_variables(state, state.params), batch["inputs"], train=False)
    return {"loss": loss(prediction, batch["targets"])}
