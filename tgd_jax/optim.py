"""The TGD mask as an optax ``GradientTransformation``.

``retrain_only(mask)`` keeps the update only where ``mask`` is True (the retrained
elements) and zeroes it everywhere else. (``optax.freeze(mask)`` has the opposite polarity,
True = frozen; that is why the name says what the mask selects.) :func:`tgd` puts it on
both sides of an optimizer:

* FIRST, on the gradient: everything inside the optimizer (global-norm clipping, Adam's
  moments) sees the retrained elements only, so a large gradient on a frozen element
  cannot shrink a retrained element's clipped update;
* LAST, on the update: nothing inside the optimizer (decoupled weight decay, momentum) can
  move a frozen element, so ``optax.apply_updates`` leaves every frozen element
  bit-identical.

A term the optimizer ADDS to the gradient before clipping (coupled L2, :func:`kernel_l2`)
must come before the first mask to be excluded from the clipping norm on frozen elements;
:func:`make_optimizer` with ``mask=`` builds that order.

The mask lives in the transformation's state, so it is checkpointed with the optimizer state
and can be swapped between TGD rounds (TGD^n) with :func:`replace_mask` without rebuilding
the optimizer or recompiling the training step (same tree structure, new values).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tgd_jax.errors import UsageError

__all__ = ["RetrainOnlyState", "retrain_only", "tgd", "replace_mask", "find_mask",
           "check_same_layout", "kernel_l2", "kernel_leaves", "make_optimizer",
           "learning_rate_schedule", "AnchorState", "kernel_l2_sp", "warn_if_ungated"]


class RetrainOnlyState(NamedTuple):
    """State of :func:`retrain_only`.

    Attributes:
      mask: pytree mirroring params; bool leaves broadcastable to the parameter
        (True = retrain) or None (frozen leaf).

    Example:
      >>> import jax.numpy as jnp
      >>> retrain_only({"w": jnp.array([True, False])}).init({"w": jnp.zeros(2)}).mask["w"].tolist()
      [True, False]
    """

    mask: Any


def _is_none(x: Any) -> bool:
    return x is None


def _as_bool_mask(mask: Any) -> Any:
    return jax.tree.map(
        lambda m: None if m is None else jnp.asarray(m, bool), mask, is_leaf=_is_none
    )


def _copy(mask: Any) -> Any:
    """Fresh buffers for every leaf: a state whose leaves share a buffer cannot be donated
    (``jax.jit(..., donate_argnums=...)`` refuses to donate one buffer twice)."""
    return jax.tree.map(lambda m: None if m is None else jnp.array(m, copy=True), mask,
                        is_leaf=_is_none)


def retrain_only(mask: Any) -> optax.GradientTransformation:
    """Keeps the updates of retrained elements only: ``u -> where(mask, u, 0)``.

    Args:
      mask: pytree mirroring the params: bool leaves broadcastable to each parameter's
        shape (True = retrain, False = freeze), or None for a leaf frozen whole.

    Returns:
      A ``GradientTransformation`` whose state :class:`RetrainOnlyState` holds the mask
      (the update itself never changes it). ``where`` (not a product) is used so a
      non-finite update of a frozen element cannot leak in as NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = retrain_only({"w": jnp.array([True, False]), "b": None})
      >>> grads = {"w": jnp.ones(2), "b": jnp.ones(1)}
      >>> updates, _ = tx.update(grads, tx.init(grads))
      >>> updates["w"].tolist(), updates["b"].tolist()
      ([1.0, 0.0], [0.0])
    """
    initial = _as_bool_mask(mask)

    def init_fn(params: Any) -> RetrainOnlyState:
        del params
        return RetrainOnlyState(mask=_copy(initial))

    def update_fn(
        updates: Any, state: RetrainOnlyState, params: Any = None
    ) -> tuple[Any, RetrainOnlyState]:
        del params
        masked = jax.tree.map(
            lambda m, u: jnp.zeros_like(u) if m is None else jnp.where(m, u, jnp.zeros_like(u)),
            state.mask,
            updates,
            is_leaf=_is_none,
        )
        return masked, state

    return optax.GradientTransformation(init_fn, update_fn)


def warn_if_ungated(inner: optax.GradientTransformation, gated: Mapping[str, Any],
                    warn: Callable[[], None]) -> optax.GradientTransformation:
    """``inner``, watching that the gradients it gets went through paper-mode gates.

    Behind a closed gate (a frozen map of paper mode that some layer reads) the backward
    pass stops, so the gradient of the filters writing that map is exactly 0. A non-zero
    value there means the training pass ran without the gates (a plain ``apply`` instead
    of :func:`tgd_jax.training_apply`): the run is projected TGD, not the paper's. Then
    ``warn()`` is called on the host (a ``jax.debug.callback``, only on such a step).
    The watch has a cost: a host callback in the jitted step (slower dispatch; XLA's
    persistent compilation cache does not store such steps), which is why the plan's
    optimizer takes ``watch=False`` once a loop is known to apply its gates.
    Which filters are frozen is read from the TGD mask in ``inner``'s state
    (:func:`find_mask`), so a plan swapped in with :func:`replace_mask` is watched as it
    is. The state and the updates are ``inner``'s own, untouched.

    Args:
      inner: the optimizer to wrap, holding a :func:`tgd` mask (its state tree is
        unchanged, so checkpoints are too).
      gated: ``'/'``-joined kernel path (:func:`tgd_jax.graph.flat_paths`) -> ``(axis,
        flags)``: along that (output-channel) axis, True where the map written has a gate
        that closes when the map is frozen (read by a layer, not a network output).
      warn: called with no argument when a gradient leaks through a closed gate.

    Example:
      >>> import jax.numpy as jnp
      >>> said = []
      >>> mask = {"w": jnp.array([True, False])}                    # w[1] frozen
      >>> tx = warn_if_ungated(tgd(optax.sgd(1.0), mask), {"w": (0, jnp.array([True, True]))},
      ...                      lambda: said.append("ungated"))
      >>> params = {"w": jnp.zeros(2)}
      >>> _ = tx.update({"w": jnp.array([2.0, 0.0])}, tx.init(params), params)
      >>> _ = tx.update({"w": jnp.array([2.0, 1.0])}, tx.init(params), params)
      >>> jax.effects_barrier(); said
      ['ungated']
    """
    from tgd_jax.graph import flat_paths

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        mask = find_mask(state)
        if mask is not None:
            flat, masks = flat_paths(updates), flat_paths(mask, none_leaves=True)
            leaks = []
            for path, (axis, flags) in gated.items():
                if path not in flat:
                    continue
                shape = [1] * jnp.ndim(flat[path])
                shape[axis] = -1
                closed = jnp.reshape(jnp.asarray(flags), shape)
                if masks.get(path) is not None:
                    closed = closed & ~jnp.asarray(masks[path], bool)
                leaks.append(jnp.any(jnp.where(closed, flat[path] != 0, False)))
            if leaks:
                jax.lax.cond(jnp.any(jnp.stack(leaks)), lambda: jax.debug.callback(warn),
                             lambda: None)
        return inner.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(inner.init, update)


def tgd(inner: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """``chain(retrain_only(mask), inner, retrain_only(mask))``: any optimizer, restricted
    to the mask (the gradient before it, the update after it; see the module docstring).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones(3)}
      >>> tx = tgd(optax.sgd(1.0), {"w": jnp.array([True, False, True])})
      >>> updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
      >>> optax.apply_updates(params, updates)["w"].tolist()
      [0.0, 1.0, 0.0]
    """
    return optax.chain(retrain_only(mask), inner, retrain_only(mask))


def kernel_leaves(params: Any) -> Any:
    """Bool pytree mirroring ``params``: True for leaves named ``kernel`` (conv/dense weights).

    Biases and normalisation parameters are not regularised, as with Keras'
    ``kernel_regularizer``.

    Example:
      >>> import jax.numpy as jnp
      >>> kernel_leaves({"conv": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.zeros(2)}})
      {'conv': {'bias': False, 'kernel': True}}
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def kernel_l2(l2: float) -> optax.GradientTransformation:
    """Coupled L2 regularisation of the kernels: ``g -> g + l2 * w`` on every ``kernel`` leaf.

    This is the gradient of the penalty ``(l2 / 2) * sum(w ** 2)`` ADDED TO THE LOSS (Keras'
    ``kernel_regularizer=l2(lam)`` is ``l2 = 2 * lam``): chain it BEFORE the optimizer, so
    the penalty's gradient goes through Adam's normalisation like the data gradient. A
    weight that the data never pull on (it reads a feature map nobody uses, or one that is
    always zero) then decays to zero at Adam's full step size, which is what makes such
    kernels visible to KSE. This is the paper's regulariser R: under TGD the mask is the
    last transformation, so frozen elements receive no regulariser update either.

    Decoupled weight decay (``optax.adamw``) is different: it shrinks every weight by
    ``lr * weight_decay`` per step after Adam, whatever its gradient, so at the paper's
    ``lr = 1e-3`` it barely moves unused weights.

    Args:
      l2: coefficient (>= 0); 0 returns the identity.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"conv": {"kernel": jnp.full(2, 2.0), "bias": jnp.full(2, 2.0)}}
      >>> zero = {"conv": {"kernel": jnp.zeros(2), "bias": jnp.zeros(2)}}
      >>> tx = kernel_l2(0.1)
      >>> updates, _ = tx.update(zero, tx.init(params), params)
      >>> updates["conv"]["kernel"].tolist(), updates["conv"]["bias"].tolist()
      ([0.2..., 0.2...], [0.0, 0.0])
    """
    if not l2 >= 0:  # also rejects NaN
        raise UsageError(f"l2 must be >= 0, got {l2}")
    if l2 == 0:
        return optax.identity()
    return optax.masked(optax.add_decayed_weights(l2), kernel_leaves)


class AnchorState(NamedTuple):
    """State of :func:`kernel_l2_sp`.

    Attributes:
      anchor: the kernels given to ``init`` (pytree mirroring params; None at every other
        leaf): the starting point the penalty pulls back to.

    Example:
      >>> import jax.numpy as jnp
      >>> state = kernel_l2_sp(0.1).init({"conv": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}})
      >>> state.anchor["conv"]["kernel"].tolist(), state.anchor["conv"]["bias"]
      ([1.0, 1.0], None)
    """

    anchor: Any


def kernel_l2_sp(strength: float) -> optax.GradientTransformation:
    """L2-SP (Li et al., ICML 2018): coupled L2 of the kernels toward their STARTING values,
    ``g -> g + strength * (w - w0)`` on every ``kernel`` leaf.

    ``w0`` is what ``init(params)`` receives (the pretrained network, when the optimizer is
    initialised on it), kept in the state: a checkpointed optimizer state resumes with the
    same anchor. This is the gradient of ``(strength / 2) * sum((w - w0) ** 2)`` added to
    the loss, so chain it BEFORE the optimizer (as :func:`kernel_l2`). Like TGD it needs no
    old data: it keeps every weight near its pretrained value instead of freezing some.

    Args:
      strength: coefficient (>= 0); 0 returns the identity.

    Example:
      >>> import jax.numpy as jnp
      >>> start = {"conv": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}
      >>> tx = kernel_l2_sp(0.5)
      >>> state = tx.init(start)
      >>> moved = {"conv": {"kernel": jnp.array([3.0, 1.0]), "bias": jnp.full(2, 3.0)}}
      >>> zero = {"conv": {"kernel": jnp.zeros(2), "bias": jnp.zeros(2)}}
      >>> updates, _ = tx.update(zero, state, moved)
      >>> updates["conv"]["kernel"].tolist(), updates["conv"]["bias"].tolist()
      ([1.0, 0.0], [0.0, 0.0])
    """
    if not strength >= 0:  # also rejects NaN
        raise UsageError(f"l2_sp must be >= 0, got {strength}")
    if strength == 0:
        return optax.identity()

    def kernels(params: Any) -> Any:
        return jax.tree.map(lambda p, k: p if k else None, params, kernel_leaves(params))

    def init_fn(params: Any) -> AnchorState:
        # a copy: the caller may donate or update its params buffers
        return AnchorState(anchor=jax.tree.map(jnp.array, kernels(params)))

    def update_fn(updates: Any, state: AnchorState, params: Any = None
                  ) -> tuple[Any, AnchorState]:
        if params is None:
            raise ValueError("kernel_l2_sp needs the params in update(updates, state, params)")
        pulled = jax.tree.map(
            lambda g, w, w0: g if w0 is None else g + strength * (w - w0).astype(g.dtype),
            updates, params, state.anchor, is_leaf=_is_none)
        return pulled, state

    return optax.GradientTransformation(init_fn, update_fn)


def _is_freeze_state(x: Any) -> bool:
    return isinstance(x, RetrainOnlyState)


def replace_mask(opt_state: Any, mask: Any) -> Any:
    """Returns ``opt_state`` with the mask of every :class:`RetrainOnlyState` replaced.

    Only the masks change: the inner optimizer's moments, step count and schedule are
    kept. A new TGD round should start from a fresh state instead,
    ``replace_mask(tx.init(params), mask)`` (what :func:`tgd_jax.train.step.replace_plan`
    does).

    Raises:
      UsageError: if the state holds no :class:`RetrainOnlyState`, or the new mask's
        layout differs from the old one (:func:`check_same_layout`: that would recompile
        the step and break checkpoint restore).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tgd(optax.sgd(1.0), {"w": jnp.array([True, False])}).init(params)
      >>> find_mask(replace_mask(state, {"w": jnp.array([False, True])}))["w"].tolist()
      [False, True]
    """
    new_mask = _as_bool_mask(mask)
    found = []

    def swap(node: Any) -> Any:
        if not _is_freeze_state(node):
            return node
        check_same_layout(node.mask, new_mask)
        found.append(True)
        return RetrainOnlyState(mask=_copy(new_mask))

    out = jax.tree.map(swap, opt_state, is_leaf=_is_freeze_state)
    if not found:
        raise UsageError("optimizer state holds no RetrainOnlyState (was it built by tgd()?)")
    return out


def check_same_layout(old: Any, new: Any, what: str = "mask") -> None:
    """Raises a ValueError unless ``new`` has ``old``'s tree structure, ``None`` leaves in
    the same places, and leaves of the same shapes and dtypes (so that swapping one for
    the other changes values only: no recompilation, the same checkpoint layout).

    Example:
      >>> import jax.numpy as jnp
      >>> check_same_layout({"w": jnp.ones(2, bool)}, {"w": jnp.zeros(2, bool)})
      >>> check_same_layout({"w": jnp.ones(2, bool)}, {"w": jnp.ones((1, 2), bool)})
      Traceback (most recent call last):
      ...
      tgd_jax.errors.UsageError: new mask differs at 'w': bool(1, 2) instead of bool(2,)
    """
    old_leaves, old_def = jax.tree_util.tree_flatten_with_path(old, is_leaf=_is_none)
    new_leaves, new_def = jax.tree_util.tree_flatten_with_path(new, is_leaf=_is_none)
    if old_def != new_def:
        raise UsageError(f"new {what} has a different tree structure:\nold {old_def}\n"
                         f"new {new_def}")
    describe = lambda x: "None" if x is None else (  # noqa: E731
        f"{jnp.asarray(x).dtype}{tuple(jnp.shape(x))}")
    for (path, a), (_, b) in zip(old_leaves, new_leaves, strict=True):
        if describe(a) != describe(b):
            where = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            raise UsageError(f"new {what} differs at '{where}': {describe(b)} instead of "
                             f"{describe(a)}")


def find_mask(opt_state: Any) -> Any | None:
    """The mask held by the (first) :class:`RetrainOnlyState` in ``opt_state``, or None.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> state = tgd(optax.adam(1e-3), {"w": jnp.array([True])}).init({"w": jnp.zeros(1)})
      >>> find_mask(state)["w"].tolist(), find_mask(optax.adam(1e-3).init({"w": jnp.zeros(1)}))
      ([True], None)
    """
    for node in jax.tree.leaves(opt_state, is_leaf=_is_freeze_state):
        if _is_freeze_state(node):
            return node.mask
    return None


def learning_rate_schedule(learning_rate: float, schedule: str, num_steps: int, *,
                           decay_fraction: float = 1.0, final_lr_fraction: float = 0.0,
                           warmup_steps: int = 0) -> optax.Schedule:
    """The learning rate of :func:`make_optimizer`'s update of count ``c`` (0-based):
    ``constant``, or ``cosine``: decaying from ``learning_rate`` to ``final_lr_fraction *
    learning_rate`` over the first ``decay_fraction`` of ``num_steps``, then held there
    (the defaults: to 0 over the whole run). A held tail shows whether the network still
    improves once its schedule has ended (:func:`tgd_jax.train.metrics.plateau`).
    ``warmup_steps > 0`` first rises linearly from 0 to ``learning_rate`` over that many
    updates; the cosine then decays over what is left of its share, so it ends where it
    would without the warm-up.

    Example:
      >>> float(learning_rate_schedule(0.1, "cosine", 10)(10))
      0.0
      >>> hold = learning_rate_schedule(0.1, "cosine", 100, decay_fraction=0.75,
      ...                               final_lr_fraction=0.01)
      >>> [round(float(hold(c)), 6) for c in (0, 75, 99)]
      [0.1, 0.001, 0.001]
      >>> warm = learning_rate_schedule(0.1, "cosine", 100, warmup_steps=10)
      >>> [round(float(warm(c)), 6) for c in (0, 5, 10, 100)]
      [0.0, 0.05, 0.1, 0.0]
    """
    if not 0 < decay_fraction <= 1:
        raise UsageError(f"optimizer.decay_fraction must be in (0, 1], got {decay_fraction}")
    if not 0 <= final_lr_fraction < 1:
        raise UsageError(f"optimizer.final_lr_fraction must be in [0, 1), got "
                         f"{final_lr_fraction}")
    if not (isinstance(warmup_steps, int) and 0 <= warmup_steps < max(num_steps, 1)):
        raise UsageError(f"optimizer.warmup_steps must be a whole number in [0, num_steps="
                         f"{num_steps}), got {warmup_steps!r}")
    if schedule == "cosine" and warmup_steps >= round(decay_fraction * num_steps) > 0:
        decay = round(decay_fraction * num_steps)
        raise UsageError(f"optimizer.warmup_steps={warmup_steps} leaves no step for the "
                         f"cosine, which decays over the first {decay} steps (num_steps x "
                         "optimizer.decay_fraction)")
    main = _decay_schedule(learning_rate, schedule, num_steps - warmup_steps,
                           round(decay_fraction * num_steps) - warmup_steps, decay_fraction,
                           final_lr_fraction)
    if not warmup_steps:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), main], [warmup_steps])


def _decay_schedule(learning_rate: float, schedule: str, num_steps: int, decay_steps: int,
                    decay_fraction: float, final_lr_fraction: float) -> optax.Schedule:
    if schedule == "constant":
        return optax.constant_schedule(learning_rate)
    if schedule == "cosine":
        return optax.cosine_decay_schedule(learning_rate, max(1, decay_steps),
                                           alpha=final_lr_fraction)
    raise UsageError(f"optimizer.schedule must be 'constant' or 'cosine', got {schedule!r}")


def make_optimizer(
    *,
    num_steps: int,
    name: str = "adam",
    learning_rate: float = 1e-3,
    schedule: str = "constant",
    decay_fraction: float = 1.0,
    final_lr_fraction: float = 0.0,
    warmup_steps: int = 0,
    l2: float = 0.0,
    l2_sp: float = 0.0,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    grad_clip: float = 0.0,
    mask: Any = None,
) -> optax.GradientTransformation:
    """The optimizer of a run, restricted to a TGD mask when one is given.

    The keywords are the fields of a config's ``optimizer`` section, so
    ``make_optimizer(num_steps=n, **config.optimizer)`` builds the optimizer a run uses:
    ``kernel_l2(l2)`` -> ``kernel_l2_sp(l2_sp)`` -> [``retrain_only(mask)``] ->
    ``clip_by_global_norm(grad_clip)`` -> Adam / AdamW / SGD with a constant or
    cosine-decayed learning rate -> [``retrain_only(mask)``]. With a mask, the regularisers'
    terms on frozen elements are dropped before clipping, and the final update of every
    frozen element is 0.

    Both regularisers touch the conv/dense ``kernel`` leaves only (not biases, not
    normalisation scales), as Keras' ``kernel_regularizer`` does.

    Args:
      num_steps: length of the run (the cosine schedule decays to 0 over it).
      name: ``"adam"``, ``"adamw"`` (with decoupled ``weight_decay``) or ``"sgd"`` (with
        ``momentum``; 0 = plain SGD).
      learning_rate: peak learning rate (> 0).
      schedule: ``"constant"`` or ``"cosine"``.
      decay_fraction, final_lr_fraction, warmup_steps: the schedule's shape
        (:func:`learning_rate_schedule`); the defaults decay to 0 over the whole run.
      l2: coupled L2 on the kernels (:func:`kernel_l2`); 0 disables.
      l2_sp: coupled L2 of the kernels toward the params the optimizer is initialised on
        (:func:`kernel_l2_sp`, the L2-SP baseline of fine-tuning); 0 disables.
      weight_decay: decoupled weight decay of ``"adamw"`` on the kernels; must be 0 for the
        other optimizers (it would be ignored).
      momentum: SGD momentum.
      grad_clip: global-norm clipping threshold, over the retrained elements when a mask
        is given; 0 disables.
      mask: TGD params mask (:func:`retrain_only`), or None for plain training.

    Raises:
      UsageError: an unknown name or schedule, a non-positive learning rate, a negative
        coefficient, or ``weight_decay`` with an optimizer other than ``"adamw"``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = make_optimizer(num_steps=10, learning_rate=0.1, name="sgd", momentum=0.0)
      >>> params = {"w": jnp.ones(2)}
      >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
      >>> updates["w"].tolist()
      [-0.1..., -0.1...]
    """
    if not learning_rate > 0:
        raise UsageError(f"optimizer.learning_rate must be > 0, got {learning_rate}")
    for field, value in (("l2", l2), ("l2_sp", l2_sp), ("weight_decay", weight_decay),
                         ("grad_clip", grad_clip)):
        if not value >= 0:  # also rejects NaN
            raise UsageError(f"optimizer.{field} must be >= 0, got {value}")
    if weight_decay and name != "adamw":
        raise UsageError(f"optimizer.weight_decay={weight_decay} is decoupled weight decay, "
                         f"which only 'adamw' applies (optimizer.name={name!r}); use "
                         "optimizer.l2 for coupled L2")
    lr = learning_rate_schedule(learning_rate, schedule, num_steps,
                                decay_fraction=decay_fraction,
                                final_lr_fraction=final_lr_fraction, warmup_steps=warmup_steps)
    if name == "adam":
        inner = optax.adam(lr)
    elif name == "adamw":
        inner = optax.adamw(lr, weight_decay=weight_decay, mask=kernel_leaves)
    elif name == "sgd":
        inner = optax.sgd(lr, momentum=momentum or None)
    else:
        raise UsageError(f"optimizer.name must be adam, adamw or sgd, got {name!r}")
    if grad_clip > 0:
        inner = optax.chain(optax.clip_by_global_norm(grad_clip), inner)
    if mask is not None:
        inner = tgd(inner, mask)
    if l2_sp != 0:  # coupled too, like l2
        inner = optax.chain(kernel_l2_sp(l2_sp), inner)
    if l2 != 0:  # coupled: a loss term, so its gradient is masked, clipped, normalised too
        inner = optax.chain(kernel_l2(l2), inner)
    return inner
