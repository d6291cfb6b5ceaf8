"""From params to TGD mask pytrees (which elements are retrained, which stay frozen).

Conventions:

* A **channel mask** is a ``(C_out,)`` bool array per layer (keyed by its path):
  ``True`` = output channel (feature map) is retrained, ``False`` = frozen.
* A **mask pytree** mirrors the ``params`` pytree (the same type: a dict, or an NNX
  ``State``). Its leaves are bool arrays that broadcast against the parameter:
  ``(1, ..., 1, C_out)`` for a conv kernel, ``(C_out,)`` for a bias and for a BatchNorm
  ``scale``/``bias``. A leaf no rule touches is ``None``, and **``None`` means frozen**.

The rule works on a :class:`~tgd_jax.graph.ChannelGraph` (traced with
:func:`tgd_jax.trace.trace_topology`, or made from a hand-written topology, which every
function here also accepts). Each map (a channel of a layer's output, or of a residual
group) is rated by the KSE of the input channels that read it; a map read by several
layers combines their scores (``combine``: ``"max"``, retrained only if useless to every
reader; ``"mean"``; ``"min"``). It is retrained iff its score is ``< phi``, and with it
everything that makes it: the filters writing it, their biases, the BatchNorm scale and
offset (and statistics) of its channel. Maps no layer reads (the last layer's, those
reaching the output) follow ``last`` (default ``"frozen"``, as in the paper); maps written
only by layers that read the model's input follow ``first`` (``"kse"``, ``"frozen"`` or
``"train"``). Parameters that belong to no channel (a learned scalar, an embedding)
follow ``other`` (``"frozen"`` or ``"train"``), reported in the plan's summary.
docs/method.md has the details and the measured choices.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from tgd_jax import kse as kse_lib
from tgd_jax.errors import UsageError
from tgd_jax.graph import (
    PARAMS,
    ChannelGraph,
    Layer,
    as_graph,
    flat_paths,
    kernel_by_input,
    map_with_paths,
    unflatten_paths,
)
from tgd_jax.topology import Topology

__all__ = [
    "LayerPolicy",
    "COMBINE",
    "READERS",
    "layer_scores",
    "map_scores",
    "channel_masks_from_scores",
    "map_decisions",
    "gradient_reach",
    "reached_count",
    "expand_channel_masks",
    "gate_variables",
    "layer_gate_values",
    "BN_MODES",
    "running_channels",
    "running_norms",
    "statistics_mask",
    "keep_frozen",
    "mask_summary",
    "drop_kernels",
    "check_phi",
    "check_mode",
    "Mode",
    "MODES",
    "OTHER",
]

#: Policy of the first layer's maps: the rule (kse), frozen or train.
LayerPolicy = Literal["kse", "frozen", "train"]
#: "paper": TGD gates mask the cotangents AND the optax mask freezes updates (the paper).
#: "projected": only the optax mask acts (projected gradient; earlier layers still receive
#: gradient through frozen channels).
Mode = Literal["paper", "projected"]
#: The two TGD modes (:data:`Mode`).
MODES: tuple[str, ...] = ("paper", "projected")
#: How the scores of a map read by several layers combine (docs/method.md, "graphs").
COMBINE: tuple[str, ...] = ("max", "mean", "min")
#: Policies of parameters that belong to no channel.
OTHER: tuple[str, ...] = ("frozen", "train")
Params = Any
ChannelMasks = dict[str, jax.Array]
Graphish = Topology | ChannelGraph


def check_phi(phi: float) -> float:
    """``phi`` as a float, or a ValueError if it is not a KSE threshold in [0, 1].

    Example:
      >>> check_phi(0.3)
      0.3
    """
    phi = float(phi)
    if not 0.0 <= phi <= 1.0:  # also rejects NaN
        raise UsageError(f"KSE threshold phi must be in [0, 1] (KSE is normalised), got {phi}")
    return phi


def _layer_kernel(params: Params, graph: ChannelGraph, path: str) -> jax.Array:
    """A layer's kernel by input channel, ``(*spatial, C_in, C_out / groups)``
    (:func:`tgd_jax.graph.kernel_by_input`)."""
    layer = graph.layer[path]
    flat = flat_paths(params)
    if layer.kernel not in flat:
        raise UsageError(f"the graph names kernel '{layer.kernel}', which params do not have")
    return kernel_by_input(jnp.asarray(flat[layer.kernel]), layer)


def _kse_per_layer(kernels: dict[str, jax.Array], alpha: float, k: int
                   ) -> dict[str, np.ndarray]:
    """KSE of each kernel, computed on a thread per CPU core, largest layers first.

    XLA runs each layer's KSE on one CPU thread; layers are independent, so a pool
    overlaps them (about 1.8 times faster on 2 cores for a 23-layer UNet). Each result is
    the same as a sequential call's.
    """
    def one(path: str) -> tuple[str, np.ndarray]:
        return path, np.asarray(kse_lib.kse_scores(kernels[path], alpha=alpha, k=k))

    order = sorted(kernels, key=lambda p: -kernels[p].size)
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)  # the cores this process may use, not the machine's
    workers = min(len(order), cores)
    if workers <= 1:
        return dict(map(one, order))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, order))


def map_scores(params: Params, topology: Graphish, *, alpha: float = 1.0, k: int = 5,
               combine: str = "max", batch_stats: Params | None = None) -> np.ndarray:
    """KSE of every map: ``(num_maps,)`` float, NaN for a map no layer reads.

    Each reading layer's KSE (:func:`tgd_jax.kse.kse_scores` of its kernel) rates the
    map behind each of its input channels; a map read several times (by several layers,
    or twice by one) combines those scores with ``combine``.

    Example:
      >>> import jax
      >>> from tgd_jax.topology import sequential_topology
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> params = {"a": {"kernel": jax.random.normal(k1, (3, 3, 1, 4))},
      ...           "b": {"kernel": jax.random.normal(k2, (3, 3, 4, 2))}}
      >>> map_scores(params, sequential_topology(["a", "b"])).shape  # 4 + 2 maps, 2 unread
      (6,)
    """
    if combine not in COMBINE:
        raise UsageError(f"combine must be one of {COMBINE}, got {combine!r}")
    graph = as_graph(topology, params, batch_stats)
    reads = graph.reads()
    kernels = {layer.path: _layer_kernel(params, graph, layer.path) for layer in graph.layers
               if any(m >= 0 for m in layer.in_maps)}
    per_layer = _kse_per_layer(kernels, alpha, k)
    reduce = {"max": np.max, "mean": np.mean, "min": np.min}[combine]
    out = np.full(graph.num_maps, np.nan, np.float32)
    for m, readers in reads.items():
        out[m] = reduce([per_layer[path][j] for path, j in readers])
    return out


def layer_scores(
    params: Params, topology: Graphish, *, alpha: float = 1.0, k: int = 5,
    batch_stats: Params | None = None, combine: str = "max",
) -> dict[str, jax.Array]:
    """KSE of each layer's OUTPUT channels, rated by the layers that read them.

    ``batch_stats`` (here and in the functions below) lets a hand-written topology name a
    BatchNorm that has statistics but no params (no scale and offset).

    Returns:
      layer path -> ``(C_out,)`` scores in [0, 1], for every layer some of whose maps are
      read (NaN for a channel no layer reads).

    Example:
      >>> import jax
      >>> from tgd_jax.topology import sequential_topology
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> params = {"a": {"kernel": jax.random.normal(k1, (3, 3, 1, 4))},
      ...           "b": {"kernel": jax.random.normal(k2, (3, 3, 4, 2))}}
      >>> scores = layer_scores(params, sequential_topology(["a", "b"]))
      >>> {conv: s.shape for conv, s in scores.items()}
      {'a': (4,)}
    """
    graph = as_graph(topology, params, batch_stats)
    scores = map_scores(params, graph, alpha=alpha, k=k, combine=combine)
    return {layer.path: jnp.asarray(scores[list(layer.out_maps)]) for layer in graph.layers
            if not np.all(np.isnan(scores[list(layer.out_maps)]))}


def map_decisions(graph: ChannelGraph, channels: Mapping[str, Any]) -> np.ndarray:
    """Channel masks -> ``(num_maps,)`` bool, one decision per map.

    Raises:
      UsageError: a channel mask of the wrong shape, a layer without one, or channels of
        one map (a residual group) with different decisions.

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.graph import ChannelGraph, Layer
      >>> g = ChannelGraph(layers=(Layer("a", "a/kernel", 2, 3, "conv", (-1,), (0, 1)),),
      ...                  leaves={}, outputs=frozenset({0, 1}))
      >>> map_decisions(g, {"a": jnp.array([True, False])}).tolist()
      [True, False]
    """
    decision = np.zeros(graph.num_maps, bool)
    seen = np.zeros(graph.num_maps, bool)
    for layer in graph.layers:
        if layer.path not in channels:
            raise UsageError(f"no channel mask for layer '{layer.path}'")
        mask = np.asarray(channels[layer.path], bool)
        if mask.shape != (layer.c_out,):
            raise UsageError(f"channel mask for '{layer.path}' has shape {mask.shape}, "
                             f"expected ({layer.c_out},)")
        for c, m in enumerate(layer.out_maps):
            if seen[m] and decision[m] != mask[c]:
                raise UsageError(f"channel {c} of '{layer.path}' is tied to channels of "
                                 f"{graph.producers()[m]} (one map): they need one decision")
            decision[m], seen[m] = mask[c], True
    return decision


def _layer_channels(graph: ChannelGraph, decision: np.ndarray) -> ChannelMasks:
    return {layer.path: jnp.asarray(decision[list(layer.out_maps)]) for layer in graph.layers}


def channel_masks_from_scores(
    params: Params,
    topology: Graphish,
    scores: Mapping[str, Any],
    phi: float,
    *,
    first: LayerPolicy = "kse",
    last: Literal["frozen", "train"] = "frozen",
    batch_stats: Params | None = None,
) -> ChannelMasks:
    """Applies the threshold and the first/last-layer policies: layer path -> ``(C_out,)`` bool.

    ``scores`` holds, per layer whose maps are read, the ``(C_out,)`` score of each output
    channel (:func:`layer_scores`).

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> params = {"a": {"kernel": jnp.zeros((3, 3, 1, 3))},
      ...           "b": {"kernel": jnp.zeros((3, 3, 3, 1))}}
      >>> masks = channel_masks_from_scores(
      ...     params, sequential_topology(["a", "b"]), {"a": jnp.array([0.1, 0.5, 0.2])}, 0.3)
      >>> {name: m.tolist() for name, m in masks.items()}
      {'a': [True, False, True], 'b': [False]}
    """
    graph = as_graph(topology, params, batch_stats)
    phi = check_phi(phi)
    _check_policy("first", first, ("kse", "frozen", "train"))
    _check_policy("last", last, ("frozen", "train"))
    reads = graph.reads()
    first_layers = set(graph.first_layers())
    producers = graph.producers()
    per_map = np.full(graph.num_maps, np.nan)
    for layer in graph.layers:
        if layer.path in scores:
            score = np.asarray(scores[layer.path], np.float32)
            if score.shape != (layer.c_out,):
                raise UsageError(f"scores for '{layer.path}' have shape {score.shape}, "
                                 f"expected ({layer.c_out},)")
            per_map[list(layer.out_maps)] = score
    decision = np.zeros(graph.num_maps, bool)
    for m in range(graph.num_maps):
        if m in graph.outputs or m not in reads:
            policy = last
        elif first_layers.issuperset(producers.get(m, ())):
            policy = first
        else:
            policy = "kse"
        if policy == "kse":
            if np.isnan(per_map[m]):
                layer = producers[m][0]
                raise UsageError(f"no KSE scores for layer '{layer}'")
            decision[m] = per_map[m] < phi
        else:
            decision[m] = policy == "train"
    return _layer_channels(graph, decision)


#: Which frozen filters also retrain their input slices that read retrained maps.
READERS: tuple[str, ...] = ("none", "all", "last")


def expand_channel_masks(params: Params, topology: Graphish, channels: Mapping[str, Any],
                         batch_stats: Params | None = None, *, other: str = "frozen",
                         readers: str = "none") -> Any:
    """Channel masks -> mask pytree mirroring ``params`` (the same pytree type).

    A layer's kernel gets its channel mask along its output axis; each per-channel
    parameter (bias, BatchNorm scale/offset) the decision of the maps along its channel
    axis; parameters of no channel are None (``other="frozen"``) or all True
    (``other="train"``).

    ``readers`` also retrains, in the kernels of the layers that read retrained maps, the
    input slices ``W[..., j, :]`` that read them (``"all"`` readers, or ``"last"``: only
    the layers whose maps no layer reads): the path from the new maps into the kept
    network. A frozen filter then keeps its weights on frozen maps only.

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> params = {"a": {"kernel": jnp.zeros((3, 3, 1, 2)), "bias": jnp.zeros(2)},
      ...           "head": {"kernel": jnp.zeros((2, 1))}}
      >>> mask = expand_channel_masks(params, sequential_topology(["a"]),
      ...                             {"a": jnp.array([True, False])})
      >>> mask["a"]["kernel"].shape, mask["a"]["bias"].tolist(), mask["head"]["kernel"]
      ((1, 1, 1, 2), [True, False], None)
    """
    _check_policy("other", other, OTHER)
    _check_policy("readers", readers, READERS)
    graph = as_graph(topology, params, batch_stats)
    decision = map_decisions(graph, channels)
    reading = None
    if readers != "none":
        reads = graph.reads()
        last = {layer.path for layer in graph.layers
                if all(m not in reads or m in graph.outputs for m in layer.out_maps)}
        reading = {layer.path: np.array([m >= 0 and bool(decision[m]) for m in layer.in_maps])
                   for layer in graph.layers if readers == "all" or layer.path in last}
    return _mirror(params, graph, decision, PARAMS, other=other, reading=reading)


def _mirror(tree: Params, graph: ChannelGraph, decision: np.ndarray, collection: str, *,
            other: str = "frozen", keep: Mapping[str, np.ndarray] | None = None,
            reading: Mapping[str, np.ndarray] | None = None) -> Any:
    """A mask mirroring ``tree`` (a collection of the graph's variables); ``reading``:
    layer -> ``(C_in,)`` input slices retrained as well."""
    kernels = {layer.kernel: layer for layer in graph.layers} if collection == PARAMS else {}

    def leaf_mask(path: str, leaf: Any) -> Any:
        if path in kernels:
            layer = kernels[path]
            shape = [1] * np.ndim(leaf)
            shape[layer.out_axis] = layer.c_out
            out = np.asarray(decision[list(layer.out_maps)]).reshape(shape)
            if reading is not None and layer.path in reading and reading[layer.path].any():
                out = out | _reading_mask(reading[layer.path], layer, np.ndim(leaf))
            return jnp.asarray(out)
        attached = graph.leaves.get(f"{collection}/{path}")
        if attached is not None:
            axis, maps = attached
            values = np.array([decision[m] if m >= 0 else False for m in maps])
            if keep is not None and f"{collection}/{path}" in keep:
                values &= keep[f"{collection}/{path}"]
            shape = [1] * np.ndim(leaf)
            shape[axis] = len(maps)
            return jnp.asarray(values).reshape(shape)
        return jnp.ones((), bool) if other == "train" else None

    return map_with_paths(leaf_mask, tree)


def _reading_mask(reading: np.ndarray, layer: Layer, ndim: int) -> np.ndarray:
    """``(C_in,)`` retrained input channels -> the kernel elements that read them, shaped to
    broadcast against the kernel: element ``[..., j, o]`` of a grouped kernel reads input
    channel ``(o // (C_out / groups)) * (C_in / groups) + j``."""
    shape = [1] * ndim
    if layer.groups == 1:
        shape[layer.in_axis] = layer.c_in
        return reading.reshape(shape)
    per_in, per_out = layer.c_in // layer.groups, layer.c_out // layer.groups
    j, o = np.meshgrid(np.arange(per_in), np.arange(layer.c_out), indexing="ij")
    table = reading[(o // per_out) * per_in + j]  # (C_in / groups, C_out)
    shape[layer.in_axis], shape[layer.out_axis] = per_in, layer.c_out
    if layer.in_axis > layer.out_axis:
        table = table.T
    return table.reshape(shape)


def check_mode(mode: str) -> str:
    """``mode`` itself, or a ValueError naming :data:`MODES` if it is not one of them.

    Example:
      >>> check_mode("projected")
      'projected'
    """
    if mode not in MODES:
        raise UsageError(f"TGD mode must be one of {MODES}, got {mode!r}")
    return mode


def gate_variables(
    topology: Graphish,
    channels: Mapping[str, Any],
    mode: Mode = "paper",
) -> dict[str, Any]:
    """The ``"tgd"`` variable collection read by :class:`tgd_jax.gate.TGDGate` modules.

    In ``"paper"`` mode each gate carries its channels' masks, except gates of maps no
    layer reads (the last layer's): masking their cotangent would stop every gradient, so
    those stay open and the layer is frozen by the optax mask alone. In ``"projected"``
    mode every gate is open (all ones) and only the optax mask acts. The gates are the
    ``'tgd/<gate>/mask'`` leaves the graph attached to channels (a hand-written
    topology's :attr:`~tgd_jax.topology.ConvNode.gates`, converted by
    :func:`~tgd_jax.graph.as_graph`).

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> topology = sequential_topology(["a", "b"], gates={"a": ["gate_a"]})
      >>> channels = {"a": jnp.array([True, False]), "b": jnp.array([False])}
      >>> gate_variables(topology, channels, "paper")["gate_a"]["mask"].tolist()
      [True, False]
      >>> gate_variables(topology, channels, "projected")["gate_a"]["mask"].tolist()
      [True, True]
    """
    check_mode(mode)
    graph = as_graph(topology, channels=channels)
    decision = map_decisions(graph, channels)
    reads = graph.reads()
    flat: dict[str, Any] = {}
    for name, (_, maps) in graph.leaves.items():
        collection, _, path = name.partition("/")
        if collection != "tgd":
            continue
        flat[path] = jnp.asarray([True if mode == "projected" or m < 0 or m not in reads
                                  or m in graph.outputs else bool(decision[m])
                                  for m in maps])
    return unflatten_paths(flat)


def layer_gate_values(topology: Graphish, channels: Mapping[str, Any],
                      params: Params | None = None) -> dict[str, np.ndarray]:
    """Layer path -> ``(C_out,)`` bool: what paper-mode gates let through on its channels.

    A retrained map's gate is open and a frozen one's closed; a map no layer reads (or that
    reaches the output) stays open, since masking it would stop every gradient. These are
    the values :func:`tgd_jax.autogate.gated` applies (no gate modules needed).

    Example:
      >>> from tgd_jax.graph import ChannelGraph, Layer
      >>> g = ChannelGraph(layers=(Layer("a", "a/kernel", 2, 3, "conv", (-1,), (0, 1)),
      ...                          Layer("b", "b/kernel", 2, 3, "conv", (0, 1), (2,))),
      ...                  leaves={}, outputs=frozenset({2}))
      >>> {k: v.tolist() for k, v in layer_gate_values(g, {"a": [False, True],
      ...                                                  "b": [False]}).items()}
      {'a': [False, True], 'b': [True]}
    """
    graph = as_graph(topology, params, channels=channels)
    decision = map_decisions(graph, channels)
    reads = graph.reads()
    return {layer.path: np.array([bool(decision[m]) or m not in reads or m in graph.outputs
                                  for m in layer.out_maps]) for layer in graph.layers}


def gradient_reach(graph: ChannelGraph, channels: Mapping[str, Any]) -> dict[int, bool]:
    """Map id -> whether the loss's gradient reaches that map's output in paper mode.

    A paper-mode gate lets a map's cotangent through when it is open
    (:func:`layer_gate_values`: retrained, read by no layer, or an output). The cotangent
    at a map is non-zero when its gate is open and it is an output, or a layer reading it
    has an output map that the gradient reaches (the gradient flows back through that
    layer's kernel whether or not the kernel is trained). A retrained map none of whose
    readers' outputs is reached receives no gradient: its retrained elements stay as they
    are.

    Example:
      >>> from tgd_jax.graph import ChannelGraph, Layer
      >>> g = ChannelGraph(layers=(Layer("a", "a/kernel", 2, 3, "conv", (-1,), (0, 1)),
      ...                          Layer("b", "b/kernel", 2, 3, "conv", (0, 1), (2, 3)),
      ...                          Layer("c", "c/kernel", 2, 3, "conv", (2, 3), (4,))),
      ...                  leaves={}, outputs=frozenset({4}))
      >>> reach = gradient_reach(g, {"a": [True, True], "b": [False, True], "c": [False]})
      >>> [reach[m] for m in range(5)]   # map 2 is frozen: its gate is closed
      [True, True, False, True, True]
    """
    decision = map_decisions(graph, channels)
    reads = graph.reads()
    # map -> the output maps of its readers that its value can move: all of a reader's,
    # or for a grouped conv only those of the groups whose inputs hold the map
    readers: dict[int, set[int]] = {}
    for layer in graph.layers:
        per_in, per_out = layer.c_in // layer.groups, layer.c_out // layer.groups
        for j, m in enumerate(layer.in_maps):
            if m >= 0:
                g = j // per_in
                readers.setdefault(m, set()).update(layer.out_maps[g * per_out:
                                                                   (g + 1) * per_out])
    maps = {m for layer in graph.layers for m in layer.out_maps if m >= 0}
    reached = {m: False for m in maps}
    # A fixed point: a map tied across a residual stream is written before some of its
    # readers and after others, so one reverse pass over the layers is not enough.
    changed = True
    while changed:
        changed = False
        for m in maps:
            if reached[m]:
                continue
            gate_open = bool(decision[m]) or m not in reads or m in graph.outputs
            if gate_open and (m in graph.outputs or any(
                    reached.get(c, False) for c in readers.get(m, ()))):
                reached[m] = changed = True
    return reached


def reached_count(params: Params, mask: Any, graph: ChannelGraph,
                  reached: Mapping[int, bool]) -> int:
    """How many retrained elements (``mask``) belong to maps the gradient reaches
    (:func:`gradient_reach`); elements of no channel count as reached.

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.graph import ChannelGraph, Layer
      >>> g = ChannelGraph(layers=(Layer("a", "a/kernel", 2, 3, "conv", (-1,), (0, 1)),
      ...                          Layer("b", "b/kernel", 2, 3, "conv", (0, 1), (2,))),
      ...                  leaves={}, outputs=frozenset({2}))
      >>> params = {"a": {"kernel": jnp.zeros((3, 3, 1, 2))},
      ...           "b": {"kernel": jnp.zeros((3, 3, 2, 1))}}
      >>> mask = {"a": {"kernel": jnp.array([[[[True, True]]]])}, "b": {"kernel": None}}
      >>> reached_count(params, mask, g, {0: True, 1: False, 2: True})  # map 1's 9 are cut
      9
    """
    flat_params = flat_paths(params)
    flat_mask = _flat_mask(mask, flat_params)
    axes = {layer.kernel: (layer.out_axis, layer.out_maps) for layer in graph.layers}
    for name, (axis, maps) in graph.leaves.items():
        collection, _, path = name.partition("/")
        if collection == PARAMS:
            axes.setdefault(path, (axis, maps))
    total = 0
    for path, m in flat_mask.items():
        if m is None:
            continue
        full = np.broadcast_to(np.asarray(m, bool), np.shape(flat_params[path]))
        if path in axes:
            axis, maps = axes[path]
            ok = np.array([reached.get(k, True) if k >= 0 else True for k in maps])
            shape = [1] * full.ndim
            shape[axis] = len(ok)
            full = full & ok.reshape(shape)
        total += int(full.sum())
    return total


#: How a BatchNorm channel normalises in training passes: with the batch's statistics
#: (``"batch"``, which also updates its running statistics) or with its running statistics
#: (``"running"``, as at inference; they then stay as they are).
BN_MODES: tuple[str, ...] = ("batch", "running")


def running_channels(channels: Any, *, frozen_bn: str = "running",
                     retrained_bn: str = "batch") -> np.ndarray:
    """Which of a layer's channels normalise with running statistics in training passes.

    Args:
      channels: ``(C,)`` bool, True = retrained.
      frozen_bn, retrained_bn: one of :data:`BN_MODES` for frozen / retrained channels.

    Example:
      >>> running_channels([True, False]).tolist()  # the default: frozen ones only
      [False, True]
      >>> running_channels([True, False], retrained_bn="running").tolist()  # inference mode
      [True, True]
    """
    for name, value in (("frozen_bn", frozen_bn), ("retrained_bn", retrained_bn)):
        if value not in BN_MODES:
            raise UsageError(f"{name} must be one of {BN_MODES}, got {value!r}")
    channels = np.asarray(channels, bool)
    return (~channels & (frozen_bn == "running")) | (channels & (retrained_bn == "running"))


def running_norms(topology: Graphish, channels: Mapping[str, Any], *,
                  frozen_bn: str = "running", retrained_bn: str = "batch"
                  ) -> dict[str, np.ndarray]:
    """BatchNorm module path -> ``(C,)`` bool: the channels that normalise with running
    statistics in training passes (:func:`running_channels`; applied by
    :func:`tgd_jax.batchnorm.running_statistics`).

    A BatchNorm is found from its running statistics (``batch_stats/<module>/mean``) in a
    graph, or named by a topology's ``norm``.

    Example:
      >>> from tgd_jax.topology import sequential_topology
      >>> topology = sequential_topology(["a", "b"], norms={"a": "bn"})
      >>> running_norms(topology, {"a": [True, False], "b": [False]})["bn"].tolist()
      [False, True]
    """
    graph = as_graph(topology, channels=channels)
    decision = map_decisions(graph, channels)
    out = {}
    for name, (_, maps) in graph.leaves.items():
        collection, _, path = name.partition("/")
        if collection != "batch_stats":
            continue
        module = path.rsplit("/", 1)[0] if "/" in path else ""
        out[module] = running_channels([decision[m] if m >= 0 else False for m in maps],
                                       frozen_bn=frozen_bn, retrained_bn=retrained_bn)
    return out


def statistics_mask(batch_stats: Params, topology: Graphish, channels: Mapping[str, Any],
                    running: Mapping[str, Any] | None = None, *,
                    params: Params | None = None) -> Any:
    """Which running statistics a training pass may change: a mask mirroring ``batch_stats``.

    A BatchNorm's ``(C,)`` statistics (``mean``, ``var``) follow the decision of their
    channels: True for a retrained channel that normalises with batch statistics, False
    for a frozen one and for one that normalises with its running statistics
    (``running``: BatchNorm path -> ``(C,)`` bool, :func:`running_norms`). Statistics of no
    channel are None (kept). A hand-written topology is converted with
    :func:`~tgd_jax.graph.as_graph` (its channel counts from ``params`` if given, else from
    ``channels``).

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> topology = sequential_topology(["a", "b"], norms={"a": "bn"})
      >>> stats = {"bn": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}
      >>> mask = statistics_mask(stats, topology, {"a": jnp.array([True, False]),
      ...                                          "b": jnp.array([False])})
      >>> mask["bn"]["var"].tolist()
      [True, False]
    """
    graph = as_graph(topology, params, batch_stats, channels=channels)
    decision = map_decisions(graph, channels)
    keep = {}
    for name in graph.leaves:
        collection, _, path = name.partition("/")
        module = path.rsplit("/", 1)[0] if "/" in path else ""
        if collection == "batch_stats" and running is not None and module in running:
            keep[name] = ~np.asarray(running[module], bool)
    return _mirror(batch_stats, graph, decision, "batch_stats", keep=keep)


def keep_frozen(old: Any, new: Any, mask: Any) -> Any:
    """``new`` where ``mask`` is True, ``old`` elsewhere (a None mask leaf keeps ``old``).

    For a training loop of your own: after a training-mode forward pass, the BatchNorm
    running statistics of frozen channels must be put back,
    ``batch_stats = keep_frozen(old_stats, new_stats, plan.stats_mask)``.

    Example:
      >>> import jax.numpy as jnp
      >>> old, new = {"bn": {"mean": jnp.zeros(2)}}, {"bn": {"mean": jnp.ones(2)}}
      >>> keep_frozen(old, new, {"bn": {"mean": jnp.array([True, False])}})["bn"]["mean"].tolist()
      [1.0, 0.0]
    """
    return jax.tree.map(lambda m, o, n: o if m is None else jnp.where(m, n, o), mask, old, new,
                        is_leaf=lambda x: x is None)


def mask_summary(
    params: Params,
    mask: Any,
    topology: Graphish,
    *,
    scores: Mapping[str, Any] | None = None,
    phi: float | None = None,
    batch_stats: Params | None = None,
) -> dict[str, Any]:
    """Per-layer and total counts of retrained channels and parameters (JSON-serialisable).

    Returns a dict with ``layers`` (one entry per layer: channels and parameters retrained
    and in total, counting the per-channel parameters of its maps, the KSE values if
    given), ``params_retrained``, ``params_total`` and ``retrained_fraction`` over ALL
    parameters, and ``other`` (the parameters of no channel: retrained and total).

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> params = {"a": {"kernel": jnp.zeros((3, 3, 1, 2)), "bias": jnp.zeros(2)}}
      >>> mask = {"a": {"kernel": jnp.array([[[[True, False]]]]), "bias": jnp.array([True, False])}}
      >>> s = mask_summary(params, mask, sequential_topology(["a"]))
      >>> s["params_retrained"], s["params_total"], s["layers"][0]["channels_retrained"]
      (10, 20, 1)
    """
    graph = as_graph(topology, params, batch_stats)
    flat_params = flat_paths(params)
    flat_mask = _flat_mask(mask, flat_params)
    counts = {
        path: int(np.broadcast_to(np.asarray(m), np.shape(flat_params[path])).sum())
        if m is not None else 0
        for path, m in flat_mask.items()
    }
    owner: dict[str, str] = {}  # a per-channel leaf counts under its first map's first writer
    producers = graph.producers()
    for name, (_, maps) in graph.leaves.items():
        collection, _, path = name.partition("/")
        written = [m for m in maps if m >= 0]
        if collection == PARAMS and path in flat_params and written:
            owner[path] = producers[written[0]][0]
    readers = graph.readers
    layers = []
    for layer in graph.layers:
        leaves = [layer.kernel] + [p for p, o in owner.items() if o == layer.path]
        kernel_mask = flat_mask[layer.kernel]
        shape = np.shape(flat_params[layer.kernel])
        channels = 0 if kernel_mask is None else int(np.moveaxis(
            np.broadcast_to(kernel_mask, shape), layer.out_axis, -1
        ).reshape(-1, layer.c_out).any(axis=0).sum())
        entry: dict[str, Any] = {
            "layer": layer.path,
            "consumer": readers[layer.path][0][0] if readers[layer.path] else None,
            "channels_total": layer.c_out,
            "channels_retrained": channels,
            "params_total": int(sum(np.size(flat_params[p]) for p in leaves)),
            "params_retrained": int(sum(counts[p] for p in leaves)),
        }
        if scores is not None and layer.path in scores:
            entry["kse"] = [None if np.isnan(v) else float(v)
                            for v in np.asarray(scores[layer.path])]
        layers.append(entry)
    total = int(sum(np.size(p) for p in flat_params.values()))
    retrained = int(sum(counts.values()))
    other = [f"{PARAMS}/{p}" for p in flat_params if f"{PARAMS}/{p}" in graph.other]
    summary = {
        "phi": None if phi is None else float(phi),
        "layers": layers,
        "params_total": total,
        "params_retrained": retrained,
        "retrained_fraction": retrained / total if total else 0.0,
    }
    if other:
        summary["other"] = {
            "leaves": [p.partition("/")[2] for p in other],
            "params_total": int(sum(np.size(flat_params[p.partition("/")[2]]) for p in other)),
            "params_retrained": int(sum(counts[p.partition("/")[2]] for p in other))}
    return summary


def drop_kernels(params: Params, mask: Any) -> Any:
    """Zeroes every retrainable element (the "useless" kernels, their biases and BN affine).

    This is the paper's threshold study: with the filter, bias and BatchNorm scale/offset of
    a channel zeroed, that feature map is exactly 0 at inference. None leaves (frozen) are
    kept.

    Example:
      >>> import jax.numpy as jnp
      >>> dropped = drop_kernels({"w": jnp.ones(2), "b": jnp.ones(2)},
      ...                        {"w": jnp.array([True, False]), "b": None})
      >>> dropped["w"].tolist(), dropped["b"].tolist()
      ([0.0, 1.0], [1.0, 1.0])
    """
    return jax.tree.map(
        lambda m, p: p if m is None else jnp.where(m, jnp.zeros_like(p), p),
        mask,
        params,
        is_leaf=lambda x: x is None,
    )


def _flat_mask(mask: Any, flat_params: Mapping[str, Any]) -> dict[str, Any]:
    """Flattens a mask pytree and checks it against the params it should mirror."""
    flat_mask = flat_paths(mask, none_leaves=True)
    missing = sorted(set(flat_params) - set(flat_mask))
    extra = sorted(set(flat_mask) - set(flat_params))
    if missing or extra:
        raise UsageError(f"mask does not mirror params: missing {missing}, extra {extra}")
    for path, m in flat_mask.items():
        if m is None:
            continue
        try:
            np.broadcast_shapes(np.shape(m), np.shape(flat_params[path]))
        except ValueError:
            raise UsageError(
                f"mask leaf '{path}' has shape {np.shape(m)}, which does not broadcast "
                f"to the parameter's shape {np.shape(flat_params[path])}"
            ) from None
    return flat_mask


def _check_policy(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"{name}-layer policy must be one of {allowed}, got {value!r}")
