"""Ground truth for channel graphs, found by running the network, not by reading its jaxpr.

Every layer call (a Linen ``Conv``/``ConvTranspose``/``Dense``, an NNX ``Conv``/``Linear``, or
``jax.lax.conv_general_dilated`` itself) is hooked. The network runs once to record each
layer's output; then, for one output channel of one layer at a time, it runs again with
EVERY layer's output held at its recorded value except that channel, which gets a large
random perturbation. The layer inputs that move say who reads the channel, and at which
input channel; a moving network output says that the channel reaches the output without
passing through a layer. The same is done for single elements of per-channel variables.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

Reads = dict[tuple[str, int], frozenset[tuple[str, int]]]
#: The pseudo-reader of the network's output channels in the measured reads.
OUTPUT = "<output>"


class _Hook:
    """Records layer inputs/outputs by call order and replaces outputs on request."""

    def __init__(self) -> None:
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: dict[str, np.ndarray] = {}
        self.fixed: dict[str, np.ndarray] | None = None  # layer -> output to return
        self.order: list[str] = []

    def __call__(self, name: str, x: Any, compute: Callable[[], Any]) -> Any:
        self.inputs[name] = np.asarray(x)
        self.order.append(name)
        out = compute()
        if self.fixed is not None:
            out = jnp.asarray(self.fixed[name], out.dtype)
        self.outputs[name] = np.asarray(out)
        return out


@contextlib.contextmanager
def _linen(hook: _Hook) -> Iterator[None]:
    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        if context.method_name == "__call__" and isinstance(
                module, nn.Conv | nn.ConvTranspose | nn.Dense):
            return hook("/".join(module.path), args[0], lambda: next_fun(*args, **kwargs))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


@contextlib.contextmanager
def _nnx(hook: _Hook, model: nnx.Module) -> Iterator[None]:
    paths = {id(node): "/".join(map(str, path)) for path, node in nnx.iter_graph(model)}
    originals = {cls: cls.__call__ for cls in (nnx.Conv, nnx.Linear)}

    def wrap(cls: type) -> Callable[..., Any]:
        original = originals[cls]

        def call(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
            return hook(paths[id(self)], x, lambda: original(self, x, *args, **kwargs))
        return call

    try:
        for cls in originals:
            cls.__call__ = wrap(cls)
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


@contextlib.contextmanager
def _lax(hook: _Hook, kernels: dict[str, np.ndarray]) -> Iterator[None]:
    original = jax.lax.conv_general_dilated

    def call(lhs: Any, rhs: Any, *args: Any, **kwargs: Any) -> Any:
        name = next(n for n, k in kernels.items()
                    if k.shape == np.shape(rhs) and np.array_equal(k, np.asarray(rhs)))
        return hook(name, lhs, lambda: original(lhs, rhs, *args, **kwargs))

    jax.lax.conv_general_dilated = call
    try:
        yield
    finally:
        jax.lax.conv_general_dilated = original


def _changed_channels(before: np.ndarray, after: np.ndarray, axis: int) -> set[int]:
    diff = np.moveaxis(np.asarray(before) != np.asarray(after), axis, -1)
    return set(np.flatnonzero(diff.reshape(-1, diff.shape[-1]).any(axis=0)).tolist())


def measure(run: Callable[[], Any], hooked: Callable[[_Hook], Any], *,
            channel_axis: int = -1, seed: int = 0,
            perturb_variables: Callable[[str, int, float], Callable[[], Any]] | None = None,
            variables: list[tuple[str, int]] = ()) -> tuple[Reads, set[tuple[str, int]],
                                                             dict[tuple[str, int], Any]]:
    """``(reads, outputs, variable_reads)`` of a network.

    ``run()`` evaluates the network (returns its output); ``hooked(hook)`` is a context
    manager installing ``hook`` on every layer call. ``reads[(layer, c)]`` is the set of
    ``(reader, input channel)`` that move when output channel c of the layer moves;
    ``outputs`` the ``(layer, c)`` whose perturbation moves the network's output.
    ``perturb_variables(name, i, delta)`` returns a run with ``delta`` added to element i
    of variable ``name``; ``variable_reads[(name, i)]`` is what moves then (either way).
    """
    rng = np.random.default_rng(seed)
    hook = _Hook()
    with hooked(hook):
        baseline_out = np.asarray(run())
    base_in, base_out, order = dict(hook.inputs), dict(hook.outputs), list(hook.order)
    if len(set(order)) != len(order):
        raise AssertionError(f"a layer ran twice: {order}")

    def moved(out: Any) -> tuple[frozenset[tuple[str, int]], bool]:
        found = set()
        for name in order:
            axis = channel_axis if hook.inputs[name].ndim > 2 else -1
            for j in _changed_channels(base_in[name], hook.inputs[name], axis):
                found.add((name, j))
        out = np.asarray(out)
        reached = bool(np.any(out != baseline_out))
        if reached:  # which output channel moved: evidence of a tie through the output
            axis = channel_axis if out.ndim > 2 else -1
            found |= {(OUTPUT, j) for j in _changed_channels(baseline_out, out, axis)}
        return frozenset(found), reached

    reads: Reads = {}
    outputs: set[tuple[str, int]] = set()
    for name in order:
        out = base_out[name]
        channels = out.shape[channel_axis if out.ndim > 2 else -1]
        for c in range(channels):
            noise = rng.normal(size=out.shape).astype(out.dtype) * (10 * (np.std(out) + 1))
            mask = np.zeros(channels, bool)
            mask[c] = True
            shape = [1] * out.ndim
            shape[channel_axis if out.ndim > 2 else -1] = channels
            fixed = dict(base_out)
            fixed[name] = out + noise * mask.reshape(shape)
            hook.fixed = fixed
            with hooked(hook):
                result = run()
            found, reached = moved(result)
            reads[(name, c)] = found
            if reached:
                outputs.add((name, c))
    variable_reads = {}
    for leaf, i in variables:
        found, reached = frozenset(), False
        for sign in (1.0, -1.0):  # both ways: a ReLU after it may hide one of them
            hook.fixed = dict(base_out)
            with hooked(hook):
                result = perturb_variables(leaf, i, 3.0 * sign)()
            more, hit = moved(result)
            found, reached = found | more, reached or hit
        variable_reads[(leaf, i)] = (found, reached)
    hook.fixed = None
    return reads, outputs, variable_reads


Maps = set[tuple[frozenset[tuple[str, int]], frozenset[tuple[str, int]]]]


def measured_maps(reads: Reads) -> Maps:
    """The maps the measurement implies: output channels whose perturbations move a common
    reader position (or output channel) are one map (their values are combined before it
    is read). Each map: (its writers ``(layer, c)``, the union of what they move, without
    the output pseudo-reader)."""
    keys = list(reads)
    parent = {k: k for k in keys}

    def find(k: Any) -> Any:
        while parent[k] != k:
            k = parent[k]
        return k

    owner: dict[tuple[str, int], Any] = {}
    for k in keys:
        for position in reads[k]:
            if position in owner:
                parent[find(k)] = find(owner[position])
            else:
                owner[position] = k
    groups: dict[Any, set[Any]] = {}
    for k in keys:
        groups.setdefault(find(k), set()).add(k)
    return {(frozenset(g), frozenset(p for k in g for p in reads[k] if p[0] != OUTPUT))
            for g in groups.values()}


def graph_maps(graph: Any) -> tuple[Maps, set[tuple[str, int]]]:
    """The same maps (writers, readers) and the output-reaching channels of a graph."""
    by_map = graph.reads()
    writers: dict[int, set[tuple[str, int]]] = {}
    outputs = set()
    for layer in graph.layers:
        for c, m in enumerate(layer.out_maps):
            writers.setdefault(m, set()).add((layer.path, c))
            if m in graph.outputs:
                outputs.add((layer.path, c))
    maps = {(frozenset(w), frozenset(by_map.get(m, ()))) for m, w in writers.items()}
    return maps, outputs


def agree(graph: Any, reads: Reads, outputs: set[tuple[str, int]]) -> None:
    """Asserts that the graph's maps and output channels are the measured ones.

    A channel whose perturbation moves nothing (its value is never read: the last block
    of a residual stream whose sum no layer reads) gives no evidence of a tie; it is left
    out of the comparison, and must belong to a graph map that is written by several
    layers or read by none.
    """
    maps, graph_outputs = graph_maps(graph)
    silent = {k for k, v in reads.items() if not v}
    measured = {(w - silent, r) for w, r in measured_maps(reads) if w - silent}
    assert measured == {(w - silent, r) for w, r in maps if w - silent}
    for writers, readers in maps:
        if writers & silent:
            assert len(writers) > 1 or not readers, sorted(writers)
    assert outputs == graph_outputs


def linen_truth(model: nn.Module, variables: Any, x: Any, leaves: list[tuple[str, int]] = ()
                ) -> tuple[Reads, set[tuple[str, int]], dict[tuple[str, int], Any]]:
    """:func:`measure` for a Linen model in inference mode; ``leaves`` are
    ``('collection/path', index)`` elements to perturb."""
    def perturbed(name: str, i: int, delta: float) -> Callable[[], Any]:
        collection, _, path = name.partition("/")

        def bump(p: Any, leaf: Any) -> Any:
            keys = "/".join(str(getattr(k, "key", k)) for k in p)
            return leaf.at[i].add(delta) if keys == f"{collection}/{path}" else leaf
        bumped = jax.tree_util.tree_map_with_path(bump, variables)
        return lambda: model.apply(bumped, x, train=False)

    return measure(lambda: model.apply(variables, x, train=False), lambda h: _linen(h),
                   perturb_variables=perturbed, variables=list(leaves))


def nnx_truth(model: nnx.Module, x: Any) -> tuple[Reads, set[tuple[str, int]], Any]:
    model.eval()
    return measure(lambda: model(x), lambda h: _nnx(h, model))


def lax_truth(apply: Callable[[Any, Any], Any], params: dict[str, Any], x: Any
              ) -> tuple[Reads, set[tuple[str, int]], Any]:
    kernels = {name: np.asarray(k) for name, k in params.items()}
    return measure(lambda: apply(params, x), lambda h: _lax(h, kernels))
