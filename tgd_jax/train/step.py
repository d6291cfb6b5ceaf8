"""Pure training and evaluation steps for (TGD-)training a Flax denoiser.

``train_step``/``eval_step`` are plain functions of ``(state, batch)``; bind the model and
optimizer with ``functools.partial`` and ``jax.jit`` them (data-parallel sharding is added
around them by the training loop, not in here).

The TGD pieces meet here: the gates travel in the state (paper mode: a ``"tgd"``
collection for gate modules, or values for :func:`tgd_jax.autogate.gated_by`), the optax
mask lives in ``opt_state`` (see :mod:`tgd_jax.optim`), frozen BatchNorm channels
normalise with running statistics (:mod:`tgd_jax.batchnorm`), and
the BatchNorm running statistics of frozen channels are kept unchanged
(``freeze_batch_stats=True``, the default) using the plan's ``stats_mask``, also in the
state. :func:`create_train_state` checks that these copies of the plan agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from tgd_jax import masks as masks_lib
from tgd_jax.autogate import gated_by
from tgd_jax.batchnorm import running_statistics
from tgd_jax.errors import UsageError
from tgd_jax.gate import GATE_COLLECTION
from tgd_jax.graph import ChannelGraph, flat_paths
from tgd_jax.methods import TGDPlan
from tgd_jax.optim import check_same_layout, find_mask, replace_mask

__all__ = ["TrainState", "create_train_state", "train_step", "eval_step", "mse", "mae",
           "LOSSES", "replace_plan", "masked_cosine", "apply_train", "estimate_statistics"]

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
      frozen_bn: per BatchNorm (path -> ``(C,)`` bool, nested), the channels that
        normalise with their running statistics in training-mode passes (``{}``: batch
        statistics everywhere, the usual); :func:`tgd_jax.batchnorm.running_statistics`.
      stats_mask: which running statistics a training pass may change, mirroring
        ``batch_stats`` (``{}``: all of them, plain training).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    gates: Any
    frozen_bn: Any = flax.struct.field(default_factory=dict)
    stats_mask: Any = flax.struct.field(default_factory=dict)


def _own_buffers(tree: Any) -> Any:
    """Every array leaf copied into a buffer of its own: the plan's fields share arrays
    (one channel mask is the bias mask, the gate mask, ...), and a jitted step that
    donates its state refuses to donate one buffer twice."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _check_plan(plan: TGDPlan, opt_state: Any, batch_stats: Any, model_gates: Any) -> None:
    """The optimizer and the variables must carry the plan they are trained with."""
    carried = find_mask(opt_state)
    if plan.mask is None:
        if carried is not None:
            raise UsageError(f"the {plan.method!r} plan has no mask, but the optimizer "
                             "carries one: build it with plan.optimizer(...)")
    elif carried is None:
        raise UsageError("the optimizer does not carry the plan's mask, so frozen weights "
                         "would move: build it with plan.optimizer(inner) or "
                         "plan.optimizer(num_steps=..., ...)")
    else:
        try:
            check_same_layout(plan.mask, carried)
            same = jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), plan.mask,
                                             carried))
        except ValueError:
            same = False
        if not same:
            raise UsageError("the optimizer carries another mask than the plan's: build it "
                             "with this plan's plan.optimizer(...)")
    if plan.gates and not plan.auto_gates:
        if jax.tree.structure(model_gates) != jax.tree.structure(plan.gates):
            raise UsageError(
                "the plan's gates do not match the model's gate modules: plan "
                f"{sorted(flat_paths(plan.gates))}, model {sorted(flat_paths(model_gates))} "
                f"(variables['{GATE_COLLECTION}'], from model.init); misspelled or "
                "missing gate names would leave gates open")
    if batch_stats and plan.stats_mask is None:
        raise UsageError("the model has batch_stats but the plan was made without them, so "
                         "it cannot say which running statistics stay frozen: pass "
                         "batch_stats=variables['batch_stats'] to the plan")
    if plan.stats_mask is not None and (jax.tree.structure(plan.stats_mask, is_leaf=_none)
                                        != jax.tree.structure(batch_stats, is_leaf=_none)):
        raise UsageError("the plan's stats_mask does not mirror the model's batch_stats; "
                         "was it made from another network?")


def _none(x: Any) -> bool:
    return x is None


def create_train_state(variables: dict[str, Any], tx: optax.GradientTransformation,
                       plan: TGDPlan | None = None) -> TrainState:
    """A fresh state from model variables (``params``, optional ``batch_stats``).

    Args:
      variables: the model's variables.
      tx: the full optimizer; for a fine-tuning run ``plan.optimizer(...)``, so that the
        plan's mask is in ``opt_state``.
      plan: the :class:`tgd_jax.methods.TGDPlan` being trained: its gate, frozen-BN and
        statistics collections go into the state (None: plain training).

    Every leaf of the state has a buffer of its own, so a jitted step may donate it.

    Raises:
      UsageError: ``tx`` does not carry the plan's mask (or carries one for a plan without
        a mask); the model has ``batch_stats`` but the plan was made without them; the
        plan's gates are not the model's gate modules (``variables["tgd"]``).
    """
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    opt_state = tx.init(params)
    if plan is not None:
        _check_plan(plan, opt_state, batch_stats, variables.get(GATE_COLLECTION, {}))
    return _own_buffers(TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        gates={} if plan is None else plan.gates,
        frozen_bn={} if plan is None else plan.frozen_bn,
        stats_mask={} if plan is None or plan.stats_mask is None else plan.stats_mask,
    ))


def replace_plan(state: TrainState, plan: TGDPlan, tx: optax.GradientTransformation
                 ) -> TrainState:
    """The next TGD round (TGD^n): a new decision, and a fresh optimizer for it.

    Every copy of the decision is swapped in one call: the optax mask in ``opt_state``,
    the gate collection, the frozen-BN collection and the statistics mask, so a round can
    never run on part of the previous round's decision. The round starts with a FRESH
    optimizer state, ``tx.init`` with the new mask: zero moments, step count 0, the
    learning-rate schedule from its start. (Kept moments would give newly retrained
    elements steps of several times the learning rate, and a finished cosine schedule a
    learning rate of 0.) ``state.step``, the run's step counter, continues. Tree
    structures must match the current ones (no recompilation, the same checkpoint layout).

    Args:
      state: the current state.
      plan: the new decision, e.g. ``tgd_plan(state.params, ...)`` on the fine-tuned params.
      tx: the run's optimizer (the one the state was created with).
    """
    if plan.mask is None:
        raise UsageError(f"a {plan.method!r} plan has no mask to swap in; TGD rounds need "
                         "a masked method")
    stats_mask = {} if plan.stats_mask is None else plan.stats_mask
    for name, old, new in (("gates", state.gates, plan.gates),
                           ("frozen_bn", state.frozen_bn, plan.frozen_bn),
                           ("stats_mask", state.stats_mask, stats_mask)):
        if jax.tree.structure(new) != jax.tree.structure(old):
            raise UsageError(f"the new plan's {name} have a different tree structure:\n"
                             f"old {jax.tree.structure(old)}\nnew {jax.tree.structure(new)}")
    opt_state = replace_mask(tx.init(state.params), plan.mask)
    _check_plan(plan, opt_state, state.batch_stats, state.gates)
    return state.replace(**_own_buffers(dict(
        opt_state=opt_state, gates=plan.gates, frozen_bn=plan.frozen_bn,
        stats_mask=stats_mask)))


def masked_cosine(a: Any, b: Any, mask: Any) -> jax.Array:
    """Cosine between two gradient pytrees restricted to the elements ``mask`` retrains."""
    def keep(m: Any, x: jax.Array) -> jax.Array:
        return jnp.zeros_like(x) if m is None else jnp.where(m, x, 0.0)

    is_none = lambda x: x is None  # noqa: E731
    a = jax.tree.leaves(jax.tree.map(keep, mask, a, is_leaf=is_none))
    b = jax.tree.leaves(jax.tree.map(keep, mask, b, is_leaf=is_none))
    dot = sum(jnp.vdot(x, y) for x, y in zip(a, b, strict=True))
    norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in a) * sum(jnp.vdot(y, y) for y in b))
    return jnp.where(norm > 0, dot / jnp.maximum(norm, 1e-30), 0.0)


def mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over all elements (the paper's loss)."""
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))


def mae(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute error over all elements (an L1 alternative)."""
    return jnp.mean(jnp.abs(prediction.astype(jnp.float32) - target.astype(jnp.float32)))


#: Losses selectable by name (``config.loss``).
LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {"mse": mse, "mae": mae}


def _variables(state: TrainState, params: Any, gates: Any = None) -> dict[str, Any]:
    variables = {"params": params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    if gates:
        variables[GATE_COLLECTION] = gates
    return variables


def apply_train(state: TrainState, params: Any, inputs: jax.Array, *, model: nn.Module,
                gates: Any = None, graph: ChannelGraph | None = None,
                rng: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """The model's training-mode forward pass on ``inputs`` as TGD trains it.

    ``(prediction, new batch_stats)``: the plan's frozen BatchNorm channels normalise with
    their running statistics (:func:`tgd_jax.batchnorm.running_statistics`), its gates act
    (a ``"tgd"`` collection, or with ``graph`` the automatic gates of
    :func:`tgd_jax.autogate.gated_by`), and ``rng`` feeds the model's ``dropout`` stream.
    """
    gates = state.gates if gates is None else gates
    kwargs: dict[str, Any] = {"train": True, "mutable": ["batch_stats"]}
    if rng is not None:
        kwargs["rngs"] = {"dropout": rng}
    running = flat_paths(state.frozen_bn)
    context = running_statistics(running) if running else contextlib.nullcontext()
    with context:
        if graph is not None:
            prediction, updates = gated_by(model.apply, graph)(
                gates, _variables(state, params), inputs, **kwargs)
        else:
            prediction, updates = model.apply(_variables(state, params, gates), inputs,
                                              **kwargs)
    return prediction, updates.get("batch_stats", {})


def estimate_statistics(model: nn.Module, variables: dict[str, Any], batches: Any,
                        mask: Any) -> Any:
    """Running BatchNorm statistics re-estimated on data where ``mask`` says (a mirror of
    ``batch_stats``, e.g. a plan's channels after :func:`tgd_jax.methods.reinitialize`):
    the mean of the batch statistics over ``batches`` (training-mode passes, momentum 0 in
    effect); elsewhere the statistics are kept.

    Args:
      model, variables: the network (``params`` and ``batch_stats``).
      batches: an iterable of input arrays ``(B, H, W, C)``.
      mask: bool leaves broadcastable to each statistic, None = keep.
    """
    stats = variables["batch_stats"]

    @jax.jit
    def batch_stats(x: jax.Array) -> Any:
        # with momentum m, one pass from the current values gives m * old + (1 - m) * batch:
        # solve for the batch statistics
        _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return updates["batch_stats"]

    estimates = [batch_stats(x) for x in batches]
    if not estimates:
        raise UsageError("estimate_statistics needs at least one batch")
    momentum = _bn_momentum(model)
    mean = jax.tree.map(lambda *xs: sum(xs) / len(xs), *estimates)
    batch = jax.tree.map(lambda new, old: (new - momentum * old) / (1 - momentum), mean, stats)
    return masks_lib.keep_frozen(stats, batch, mask)


def _bn_momentum(model: nn.Module) -> float:
    momentum = getattr(model, "bn_momentum", None)
    if momentum is None:
        raise UsageError(f"{type(model).__name__} has no bn_momentum attribute: the batch "
                         "statistics cannot be recovered from its running averages")
    return float(momentum)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    freeze_batch_stats: bool = True,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = mse,
    gate_cosine: bool = False,
    graph: ChannelGraph | None = None,
    dropout_seed: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on ``batch = {"inputs": (B,H,W,C), "targets": (B,H,W,C)}``.

    Args:
      state, batch: the state and the batch.
      model, tx: the Linen model and the full optimizer (the plan's mask inside).
      freeze_batch_stats: keep the running statistics the state's ``stats_mask`` freezes.
      loss: ``loss(prediction, target) -> scalar``.
      gate_cosine: also return ``"gate_cosine"``, the cosine over the retrained elements
        between the gradient the gates let through and the true gradient (all gates
        open); 1 in projected mode. Costs one more backward pass.
      graph: the plan's graph when its gates are automatic (``plan.auto_gates``).
      dropout_seed: the model's ``dropout`` stream is ``fold_in(key(seed), step)``, so a
        resumed run draws the same masks.

    Returns:
      The new state and ``{"loss": scalar, "grad_norm": scalar}`` (the norm of the whole
      gradient, before the mask).
    """
    rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)

    def loss_fn(params: Any, gates: Any) -> tuple[jax.Array, Any]:
        prediction, stats = apply_train(state, params, batch["inputs"], model=model,
                                        gates=gates, graph=graph, rng=rng)
        return loss(prediction, batch["targets"]), stats

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (value, new_stats), grads = grad_fn(state.params, state.gates)
    extra = {}
    if gate_cosine:
        open_gates = jax.tree.map(jnp.ones_like, state.gates)
        _, true_grads = grad_fn(state.params, open_gates)
        mask = find_mask(state.opt_state)
        if mask is None:
            mask = jax.tree.map(lambda _: True, state.params)
        extra["gate_cosine"] = masked_cosine(grads, true_grads, mask)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if freeze_batch_stats and state.stats_mask and new_stats:
        new_stats = masks_lib.keep_frozen(state.batch_stats, new_stats, state.stats_mask)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
    )
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    return new_state, {"loss": value, "grad_norm": grad_norm, **extra}


def eval_step(state: TrainState, batch: Batch, *, model: nn.Module,
              loss: Callable[[jax.Array, jax.Array], jax.Array] = mse) -> dict[str, jax.Array]:
    """Inference-mode loss (running BatchNorm statistics): ``{"loss": scalar}``."""
    prediction = model.apply(_variables(state, state.params), batch["inputs"], train=False)
    return {"loss": loss(prediction, batch["targets"])}
