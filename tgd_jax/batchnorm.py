"""BatchNorm channels that normalise with their running statistics while training.

TGD's default (``frozen_bn="running"``, docs/method.md) normalises FROZEN channels with
their running statistics in training passes, as at inference, so that the network trained
is the network evaluated. :func:`running_statistics` does this for any Flax Linen model
without editing it: inside the context, every ``flax.linen.BatchNorm`` named in ``flags``
is called twice in a training pass, first with its running statistics (which leave them
unchanged) and then as usual, and the flagged channels take the first result. The
statistics update of flagged channels is undone by the plan's statistics mask
(:func:`tgd_jax.masks.keep_frozen`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from tgd_jax.errors import UsageError

__all__ = ["running_statistics", "BatchNormFlagError"]


class BatchNormFlagError(UsageError):
    """A BatchNorm named in the flags was never called as a ``flax.linen.BatchNorm`` (a
    :class:`~tgd_jax.errors.UsageError`, so a ``ValueError`` too).

    Example:
      >>> from tgd_jax.errors import UsageError
      >>> issubclass(BatchNormFlagError, UsageError), issubclass(BatchNormFlagError, ValueError)
      (True, True)
    """


@contextlib.contextmanager
def running_statistics(flags: Mapping[str, Any]) -> Iterator[set[str]]:
    """Within the context, the flagged channels of each named BatchNorm use running stats.

    Args:
      flags: BatchNorm module path (``'/'``-joined, e.g. ``'encoder/norm_a'``) -> ``(C,)``
        bool, True = normalise with the running statistics in training passes.

    Yields:
      The set of paths seen so far (filled as the model runs). On leaving the context, a
      path that was never called as a ``flax.linen.BatchNorm`` raises
      :class:`BatchNormFlagError` (a custom normalisation, or a misspelled path, would
      otherwise train silently with batch statistics). A BatchNorm called in inference
      mode uses its running statistics for every channel already.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> bn = nn.BatchNorm(use_running_average=False)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> variables = bn.init(jax.random.key(0), x)  # running mean 0, var 1
      >>> with running_statistics({"": jnp.array([True, False])}):
      ...     y, _ = bn.apply(variables, x, mutable=["batch_stats"])
      >>> bool(jnp.allclose(y[:, 0], x[:, 0], atol=1e-4)), bool(jnp.allclose(y[:, 1], x[:, 1]))
      (True, False)
    """
    wanted = {str(path): jnp.asarray(flag, bool) for path, flag in flags.items()}
    seen: set[str] = set()

    def interceptor(next_fun: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    context: Any) -> Any:
        module = context.module
        if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        if path not in wanted:
            return next_fun(*args, **kwargs)
        args, call_flag = list(args), kwargs.get("use_running_average")
        if len(args) > 1:
            call_flag = args.pop(1)
            kwargs = {**kwargs, "use_running_average": call_flag}
        seen.add(path)
        if nn.merge_param("use_running_average", module.use_running_average, call_flag):
            return next_fun(*args, **kwargs)  # running statistics already, for every channel
        flag = wanted[path]
        x = args[0]
        # The running statistics as they were before this pass updates them.
        mean = module.get_variable("batch_stats", "mean")
        var = module.get_variable("batch_stats", "var")
        running = _normalize_running(module, x, mean, var)  # first, as a module would
        batch = next_fun(*args, **kwargs)
        running = running.astype(batch.dtype)
        axes = _feature_axes(module, x.ndim)
        shape = [1] * x.ndim
        for ax in axes:
            shape[ax] = x.shape[ax]
        return jnp.where(jnp.asarray(flag).reshape(shape), running, batch)

    with nn.intercept_methods(interceptor):
        yield seen
    missing = sorted(set(wanted) - seen)
    if missing:
        raise BatchNormFlagError(
            f"BatchNorm modules {missing} were never called as flax.linen.BatchNorm, so "
            "their frozen channels cannot use running statistics: use "
            "frozen_bn='batch', or a flax.linen.BatchNorm")


def _feature_axes(module: nn.BatchNorm, ndim: int) -> tuple[int, ...]:
    axes = module.axis if isinstance(module.axis, tuple | list) else (module.axis,)
    return tuple(sorted(int(a) % ndim for a in axes))


def _normalize_running(module: nn.BatchNorm, x: Any, mean: Any, var: Any) -> Any:
    """What ``module`` computes with ``use_running_average=True``, in flax's order of
    operations (``flax.linen.normalization._normalize``), from the given statistics."""
    features = _feature_axes(module, x.ndim)
    reduction = tuple(i for i in range(x.ndim) if i not in features)
    feature_shape = [1] * x.ndim
    for ax in features:
        feature_shape[ax] = x.shape[ax]
    if not module.force_float32_reductions:
        mean, var = jnp.asarray(mean, module.param_dtype), jnp.asarray(var, module.param_dtype)
    y = x - jnp.expand_dims(mean, reduction)
    mul = jax_rsqrt(jnp.expand_dims(var, reduction) + module.epsilon)
    if module.use_scale:
        mul *= _param(module, "scale").reshape(feature_shape)
    y *= mul
    if module.use_bias:
        y += _param(module, "bias").reshape(feature_shape)
    return y


def _param(module: nn.BatchNorm, name: str) -> Any:
    value = module.get_variable("params", name)
    return value if module.force_float32_reductions else jnp.asarray(value, module.param_dtype)


def jax_rsqrt(x: Any) -> Any:
    from jax import lax

    return lax.rsqrt(x)
