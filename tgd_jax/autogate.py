"""The paper's backward gates without editing the model: a transformation of its apply function.

Paper-mode TGD multiplies the cotangent of every frozen feature map by 0, after every conv
and every BatchNorm (:mod:`tgd_jax.gate`). :func:`gated` does this for any model that
:func:`tgd_jax.trace.trace_topology` can trace: it traces the call, finds every equation
that writes a map (a layer's output) or applies a per-channel parameter to one (a bias add,
a BatchNorm scale or offset), and evaluates the same equations with
:func:`tgd_jax.gate.tgd_gate` on each such output. The forward pass is unchanged; the
gradient equals that of a model with explicit :class:`~tgd_jax.gate.TGDGate` modules after
every conv and BatchNorm (tested on the DnCNN, bit for bit). Maps that no layer reads (the
last layer's) keep an open gate, as with explicit gates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tgd_jax import masks as masks_lib
from tgd_jax.errors import UsageError
from tgd_jax.gate import tgd_gate
from tgd_jax.graph import ChannelGraph, flat_paths, unflatten_paths
from tgd_jax.trace import TraceError, analyze, leaf_paths

__all__ = ["gated", "gated_by", "gate_values", "training_apply"]


def gate_values(plan: Any) -> dict[str, np.ndarray]:
    """Layer path -> ``(C_out,)`` bool gate values of ``plan``
    (:func:`tgd_jax.masks.layer_gate_values`).

    Example:
      >>> import jax
      >>> from tgd_jax.methods import tgd_plan
      >>> from tgd_jax.topology import sequential_topology
      >>> params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 1, 4))},
      ...           "b": {"kernel": jax.random.normal(jax.random.key(1), (3, 3, 4, 1))}}
      >>> plan = tgd_plan(params, sequential_topology(["a", "b"]), 0.5)
      >>> values = gate_values(plan)
      >>> bool(values["b"].all()), (values["a"] == plan.channels["a"]).all().item()
      (True, True)
    """
    return masks_lib.layer_gate_values(plan.graph, plan.channels)


def gated(apply_fn: Callable[..., Any], plan: Any) -> Callable[..., Any]:
    """``apply_fn`` with the paper's backward gates where ``plan`` freezes a map.

    Args:
      apply_fn: the function the plan's graph was traced from (``model.apply``, or an NNX
        / plain function of a variables pytree), called the same way.
      plan: a :class:`~tgd_jax.methods.TGDPlan` (its graph and channel decisions).

    Returns:
      A function with ``apply_fn``'s signature and forward values. Jit it as usual; each
      new input signature is traced once. (:func:`gated_by` takes the gate values as an
      argument instead, so that a new TGD round does not recompile.)

    Raises:
      TraceError: (when called) a construct the tracer refuses, a layer that is not the
        plan's, or a layer inside a ``custom_jvp``/``custom_vjp`` function or a ``cond``
        (its own semantics would be lost).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from tgd_jax import tgd_plan, trace_topology
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Conv(1, (3, 3), name="b")(nn.relu(nn.Conv(4, (3, 3), name="a")(x)))
      >>> x = jnp.ones((1, 6, 6, 1))
      >>> variables = Net().init(jax.random.key(0), x)
      >>> graph = trace_topology(Net().apply, variables, x)
      >>> plan = tgd_plan(variables["params"], graph, 0.5, mode="paper")
      >>> apply = gated(Net().apply, plan)
      >>> bool(jnp.all(apply(variables, x) == Net().apply(variables, x)))  # same forward
      True
      >>> grads = jax.grad(lambda v: apply(v, x).sum())(variables)["params"]
      >>> frozen = ~plan.channels["a"]
      >>> bool(jnp.all(grads["a"]["kernel"][..., frozen] == 0))  # frozen filters: no gradient
      True
    """
    if plan.graph is None:
        raise UsageError("the plan has no channel graph")
    values = unflatten_paths({k: jnp.asarray(v) for k, v in gate_values(plan).items()})
    inner = gated_by(apply_fn, plan.graph)

    def wrapped(variables: Any, *args: Any, **kwargs: Any) -> Any:
        return inner(values, variables, *args, **kwargs)

    return wrapped


def gated_by(apply_fn: Callable[..., Any], graph: ChannelGraph) -> Callable[..., Any]:
    """``fn(gates, variables, *args, **kwargs)``: ``apply_fn`` gated by call-time values.

    ``gates`` holds, per layer path (nested dicts, as :func:`gate_values` unflattened),
    the ``(C_out,)`` bool gate values of its channels; they may be traced arrays (kept in
    a training state), so new values do not recompile.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def apply(params, x):
      ...     return jax.lax.conv_general_dilated(x, params["w"], (1, 1), "SAME",
      ...                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
      >>> from tgd_jax import trace_topology
      >>> params, x = {"w": jnp.ones((1, 1, 1, 2))}, jnp.ones((1, 2, 2, 1))
      >>> fn = gated_by(apply, trace_topology(apply, params, x))
      >>> grad = jax.grad(lambda p: fn({"w": jnp.array([True, False])}, p, x).sum())(params)
      >>> grad["w"].reshape(-1).tolist()
      [4.0, 0.0]
    """
    order = [layer.path for layer in graph.layers]

    def wrapped(gates: Any, variables: Any, *args: Any, **kwargs: Any) -> Any:
        _, _, leaves = leaf_paths(variables)
        analysis = analyze(apply_fn, variables, *args, **kwargs)
        closed, out_shape = analysis.jaxpr, analysis.out_shape
        flat_gates = flat_paths(gates)
        traced = [entry["path"] for entry in analysis.layers]
        if traced != order or set(flat_gates) != set(order):
            raise TraceError(f"gated: the call's layers {traced} are not the graph's {order}, "
                             f"or the gate values name {sorted(flat_gates)}")
        values = jnp.concatenate([jnp.asarray(flat_gates[p], bool).reshape(-1) for p in order]
                                 + [jnp.ones((1,), bool)])  # the last entry: "not a map"
        index: dict[int, int] = {}
        offset = 0
        for entry in analysis.layers:
            for c, i in enumerate(entry["out_ids"]):
                index.setdefault(analysis.root(i), offset + c)
            offset += len(entry["out_ids"])

        def mask_of(ids: np.ndarray) -> jax.Array:
            return values[np.array([index[analysis.root(i)] if i >= 0 else offset
                                    for i in ids])]

        flat_out = _evaluate(closed.jaxpr, list(closed.consts),
                             list(leaves) + list(jax.tree.leaves(args)),
                             analysis.nodes, mask_of)
        return jax.tree.unflatten(jax.tree.structure(out_shape), flat_out)

    return wrapped


def _has_gate(nodes: list[dict[str, Any]]) -> bool:
    return any(n["gate"] is not None or any(_has_gate(c) for c in n["children"])
               for n in nodes)


def _evaluate(jaxpr: Any, consts: list[Any], args: list[Any], nodes: list[dict[str, Any]],
              mask_of: Callable[[np.ndarray], jax.Array]) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(atom: Any) -> Any:
        if isinstance(atom, jax.extend.core.Literal):
            return atom.val
        return env[atom]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn, node in zip(jaxpr.eqns, nodes, strict=True):
        invals = [read(a) for a in eqn.invars]
        if any(_has_gate(c) for c in node["children"]):
            outvals = _inline(eqn, invals, node, mask_of)
        else:
            outvals = _bind(eqn, invals)
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        if node["gate"] is not None and node["gate"][0] is not None:
            axis, ids = node["gate"]
            shape = [1] * np.ndim(outvals[0])
            shape[axis] = len(ids)
            outvals = [tgd_gate(outvals[0], mask_of(ids).reshape(shape)), *outvals[1:]]
        for var, value in zip(eqn.outvars, outvals, strict=True):
            env[var] = value
    return [read(a) for a in jaxpr.outvars]


def _bind(eqn: Any, invals: list[Any]) -> Any:
    """Binds an equation as ``jax.core.eval_jaxpr`` does (call primitives get their
    params through ``get_bind_params``; older JAX versions also returned sub-functions)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: tuple[Any, ...] = ()
    if isinstance(params, tuple):
        subfuns, params = params
    with eqn.ctx.manager:
        return eqn.primitive.bind(*subfuns, *invals, **params)


def _inline(eqn: Any, invals: list[Any], node: dict[str, Any],
            mask_of: Callable[[np.ndarray], jax.Array]) -> list[Any]:
    """Evaluates a call primitive's body (pjit, remat, closed_call) with gates inside."""
    name = eqn.primitive.name
    if name in ("pjit", "jit", "remat", "remat2", "checkpoint", "closed_call", "core_call"):
        closed = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
        jaxpr = getattr(closed, "jaxpr", closed)
        consts = list(getattr(closed, "consts", ()))
        (children,) = node["children"]
        return _evaluate(jaxpr, consts, invals, children, mask_of)
    raise TraceError(f"gated: a layer inside '{name}' (for example a custom_jvp or "
                     "custom_vjp function, or a cond) cannot be gated without losing its "
                     "semantics")


def training_apply(apply_fn: Callable[..., Any], plan: Any) -> Callable[..., Any]:
    """``apply_fn`` for the training passes of ``plan``, in a loop of one's own: with the
    plan's BatchNorm policy applied and, in paper mode without gate modules, its gates.

    A plan with ``frozen_bn="running"`` (the default) says that frozen BatchNorm channels
    normalise with their running statistics in training passes; a plain
    ``model.apply(..., train=True)`` normalises every channel with the batch's, so the
    network trained is not the one evaluated. This wrapper runs the call inside
    :func:`tgd_jax.batchnorm.running_statistics` with the plan's flags (Linen BatchNorm)
    and through :func:`gated` when the plan's paper-mode gates are applied from the graph.
    A plan with nothing to apply returns ``apply_fn`` itself.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from tgd_jax import tgd_plan, trace_topology
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train=False):
      ...         x = nn.Conv(4, (3, 3), use_bias=False, name="a")(x)
      ...         x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
      ...         return nn.Conv(1, (3, 3), name="b")(x)
      >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
      >>> variables = Net().init(jax.random.key(0), x)
      >>> graph = trace_topology(Net().apply, variables, x)
      >>> plan = tgd_plan(variables["params"], graph, 0.5,
      ...                 batch_stats=variables["batch_stats"])   # frozen_bn="running"
      >>> apply = training_apply(Net().apply, plan)
      >>> out, _ = apply(variables, x, train=True, mutable=["batch_stats"])
      >>> plain, _ = Net().apply(variables, x, train=True, mutable=["batch_stats"])
      >>> bool(jnp.allclose(out, plain))   # frozen channels: running, not batch statistics
      False
    """
    from tgd_jax.batchnorm import running_statistics

    inner = gated(apply_fn, plan) if getattr(plan, "auto_gates", False) else apply_fn
    flags = flat_paths(plan.frozen_bn) if plan.frozen_bn else {}
    if not flags:
        return inner

    def wrapped(variables: Any, *args: Any, **kwargs: Any) -> Any:
        with running_statistics(flags):
            return inner(variables, *args, **kwargs)

    return wrapped
