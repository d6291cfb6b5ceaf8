"""The channel graph: which feature maps each layer makes and reads, the unit TGD decides on.

TGD retrains or freezes feature maps. In a sequential ConvNet a map is one output channel
of one conv and is read by the next conv. In the networks people use, a map can be read
by several convs (a UNet's skip connection, a DenseNet's concatenations), and channels of
several convs can be tied by elementwise adds (a residual stream): then there is one map
per channel of the whole group, and one decision for it. A :class:`ChannelGraph` records
this per CHANNEL, so it is exact for any wiring:

* every layer (a conv, a transposed conv, or a dense layer that mixes the channel axis)
  has, per output channel, the id of the map (*component*) that channel writes, and per
  input channel the id of the map it reads (``-1``: not written by any layer, e.g. the
  model's input);
* channels tied by an elementwise op share one id;
* per-channel variables (conv bias, BatchNorm scale/offset and running statistics, gate
  masks) are attached to the ids of their channels;
* the maps that reach the model's output without passing through a layer are listed.

A graph comes from :func:`tgd_jax.trace.trace_topology` (read off the model's jaxpr), or from
a hand-written :class:`~tgd_jax.topology.ConvNode` topology with :func:`from_topology`.
Paths are ``'/'``-joined keys of the params pytree (``'encoder/conv_a'``); variables
outside ``params`` are named with their collection first (``'batch_stats/bn2/mean'``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tgd_jax.errors import UsageError
from tgd_jax.topology import Topology, get_path, has_path, validate_topology

__all__ = ["Layer", "ChannelGraph", "from_topology", "as_graph", "PARAMS", "key_name",
           "kernel_by_input", "flat_paths", "map_with_paths", "unflatten_paths"]

#: The collection whose leaves an optimizer trains (Linen's ``"params"``; NNX ``Param``).
PARAMS = "params"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer that mixes channels: a conv, a transposed conv, or a dense layer.

    Attributes:
      path: the layer's path, e.g. ``'encoder/conv_a'`` (its kernel's path without the
        final ``'/kernel'``).
      kernel: the params path of its kernel.
      in_axis, out_axis: the kernel's axes of input and output channels (Flax convs:
        ``-2`` and ``-1`` of ``(*spatial, C_in, C_out)``; stored non-negative).
      kind: ``"conv"``, ``"conv_transpose"`` or ``"dense"``.
      in_maps: ``(C_in,)`` id of the map each input channel reads, ``-1`` for none.
      out_maps: ``(C_out,)`` id of the map each output channel writes.
      name: where the model builds it (its name stack; for messages).
      in_sources: per input channel, the ``(writer layer, output channel)`` pairs whose
        values flow into it without passing through another layer: one pair in a chain,
        the writers added so far in a residual stream (not the later ones, which tie the
        same map). ``()``: not recorded (a hand-written topology; exact there anyway).
      groups: a grouped conv's ``feature_group_count`` (depthwise: ``C_in``): output
        channel ``o`` reads only the input channels of its group
        ``o // (C_out / groups)``, so the kernel holds ``C_in / groups`` input channels
        (:func:`kernel_by_input`).

    Example:
      >>> layer = Layer("b", "b/kernel", 2, 3, "conv", in_maps=(0, 1), out_maps=(2,))
      >>> layer.c_in, layer.c_out
      (2, 1)
    """

    path: str
    kernel: str
    in_axis: int
    out_axis: int
    kind: str
    in_maps: tuple[int, ...]
    out_maps: tuple[int, ...]
    name: str = ""
    groups: int = 1
    in_sources: tuple[tuple[tuple[str, int], ...], ...] = ()

    def __post_init__(self) -> None:
        if self.groups < 1 or self.c_in % self.groups or self.c_out % self.groups:
            raise UsageError(f"layer '{self.path}': groups={self.groups} must divide its "
                             f"{self.c_in} input and {self.c_out} output channels")

    @property
    def c_in(self) -> int:
        return len(self.in_maps)

    @property
    def c_out(self) -> int:
        return len(self.out_maps)


@dataclasses.dataclass(frozen=True)
class ChannelGraph:
    """What TGD needs to know of a network, per channel (see the module docstring).

    Attributes:
      layers: the layers in forward order.
      leaves: per-channel variables: ``'collection/path'`` -> ``(axis, maps)``, the
        leaf's channel axis and the map id of each index along it.
      outputs: ids of the maps that reach the model's output without passing through a
        layer (frozen like the last layer: no layer reads them, so no KSE rates them).
      other: variable leaves (``'collection/path'``) that are neither a layer's kernel nor
        per-channel: they follow the plan's ``other`` policy.

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> params = {"a": {"kernel": jnp.zeros((3, 3, 1, 2)), "bias": jnp.zeros(2)},
      ...           "b": {"kernel": jnp.zeros((3, 3, 2, 1))}}
      >>> graph = from_topology(sequential_topology(["a", "b"]), params)
      >>> graph.readers
      {'a': (('b', 0),), 'b': ()}
      >>> graph.leaves["params/a/bias"]
      (0, (0, 1))
    """

    layers: tuple[Layer, ...]
    leaves: Mapping[str, tuple[int, tuple[int, ...]]]
    outputs: frozenset[int]
    other: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        paths = [layer.path for layer in self.layers]
        if len(set(paths)) != len(paths):
            raise UsageError(f"layer paths must be unique, got {paths}")

    @property
    def layer(self) -> dict[str, Layer]:
        """Layers by path."""
        return {layer.path: layer for layer in self.layers}

    @property
    def num_maps(self) -> int:
        """Number of maps (ids run from 0 to ``num_maps - 1``)."""
        ids = [m for layer in self.layers for m in layer.out_maps]
        return max(ids) + 1 if ids else 0

    def producers(self) -> dict[int, tuple[str, ...]]:
        """Map id -> the layers writing it (several for a residual group)."""
        out: dict[int, list[str]] = {}
        for layer in self.layers:
            for m in dict.fromkeys(layer.out_maps):
                out.setdefault(m, []).append(layer.path)
        return {m: tuple(paths) for m, paths in out.items()}

    def reads(self) -> dict[int, list[tuple[str, int]]]:
        """Map id -> every ``(reader layer, input channel)`` that reads it."""
        out: dict[int, list[tuple[str, int]]] = {}
        for layer in self.layers:
            for j, m in enumerate(layer.in_maps):
                if m >= 0:
                    out.setdefault(m, []).append((layer.path, j))
        return out

    @property
    def readers(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """Layer -> ``((reader, offset), ...)``: every layer whose input a change of this
        layer's output moves, with the input-channel offset at which its channel ``c`` is
        read (``offset + c``). A map read twice by one layer (``concat([x, x])``) gives two
        entries. The offsets are the union over the writer's channels: where the wiring
        is not a shift (a GroupNorm group, a channels-first flatten) a channel is read at
        only some of them, and :attr:`Layer.in_sources` has the per-position truth.
        Exact per writer when the graph records :attr:`Layer.in_sources` (traced
        graphs): in a residual stream, a block's conv is not a reader of a later block's
        conv, although both write the stream's maps (:attr:`groups` ties them: one
        decision); otherwise per map."""
        out: dict[str, dict[tuple[str, int], None]] = {la.path: {} for la in self.layers}
        if all(la.in_sources or not la.in_maps for la in self.layers):
            for reader in self.layers:
                for j, sources in enumerate(reader.in_sources):
                    for writer, c in sources:
                        out[writer][(reader.path, j - c)] = None
            return {path: tuple(sorted(found, key=self._order)) for path, found in out.items()}
        reads = self.reads()
        for layer in self.layers:
            for c, m in enumerate(layer.out_maps):
                for reader, j in reads.get(m, ()):
                    out[layer.path][(reader, j - c)] = None
        return {path: tuple(found) for path, found in out.items()}

    def _order(self, entry: tuple[str, int]) -> tuple[int, int]:
        return ([la.path for la in self.layers].index(entry[0]), entry[1])

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """Layers whose channels are tied (they write the same maps): one decision per
        channel for the whole group."""
        seen: dict[tuple[str, ...], None] = {}
        for paths in self.producers().values():
            if len(paths) > 1:
                seen[paths] = None
        return tuple(seen)

    def first_layers(self) -> tuple[str, ...]:
        """Layers that read no map (only the model's input, or constants)."""
        return tuple(layer.path for layer in self.layers if all(m < 0 for m in layer.in_maps))

    def to_json(self) -> dict[str, Any]:
        """JSON form: layers (kind, shapes, maps), readers, groups, per-channel leaves."""
        return {
            "layers": [{"path": layer.path, "kind": layer.kind, "kernel": layer.kernel,
                        "in_axis": layer.in_axis, "out_axis": layer.out_axis,
                        "c_in": layer.c_in, "c_out": layer.c_out,
                        "in_maps": list(layer.in_maps), "out_maps": list(layer.out_maps),
                        "name": layer.name, "groups": layer.groups,
                        "in_sources": [[list(p) for p in ps] for ps in layer.in_sources]}
                       for layer in self.layers],
            "readers": {k: [list(r) for r in v] for k, v in self.readers.items()},
            "groups": [list(g) for g in self.groups],
            "leaves": {k: {"axis": a, "maps": list(m)} for k, (a, m) in self.leaves.items()},
            "outputs": sorted(self.outputs),
            "other": list(self.other),
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> ChannelGraph:
        """The graph :meth:`to_json` wrote (``graph.json`` of a fine-tuning run).

        Example:
          >>> g = ChannelGraph((Layer("a", "a/kernel", 2, 3, "conv", (-1,), (0,)),), {},
          ...                  frozenset({0}))
          >>> ChannelGraph.from_json(g.to_json()) == g
          True
        """
        layers = tuple(Layer(path=e["path"], kernel=e["kernel"], in_axis=int(e["in_axis"]),
                             out_axis=int(e["out_axis"]), kind=e["kind"],
                             in_maps=tuple(e["in_maps"]), out_maps=tuple(e["out_maps"]),
                             name=e.get("name", ""), groups=int(e.get("groups", 1)),
                             in_sources=tuple(tuple((str(w), int(c)) for w, c in ps)
                                              for ps in e.get("in_sources", ())))
                       for e in record["layers"])
        leaves = {k: (int(v["axis"]), tuple(v["maps"])) for k, v in record["leaves"].items()}
        return cls(layers=layers, leaves=leaves, outputs=frozenset(record["outputs"]),
                   other=tuple(record.get("other", ())))

    def __str__(self) -> str:
        return json.dumps(self.to_json()["readers"])


def kernel_by_input(kernel: Any, layer: Layer) -> Any:
    """A layer's kernel as ``(*spatial, C_in, C_out / groups)``: row ``c`` holds the
    kernels that read input channel ``c``, one per output channel of its group.

    A plain layer (``groups == 1``) is only moved to ``(..., C_in, C_out)``; a dense kernel
    gets one spatial axis of size 1. For a grouped conv, input channel ``c = g * (C_in /
    groups) + j`` is read through the kernel's slot ``j`` by the outputs of group ``g``
    only; this layout puts exactly those kernels on its row, so anything computed per input
    channel over its kernels (KSE, the L1 mass) is the same code for every layer.

    Raises:
      UsageError: the kernel's shape does not fit the layer.

    Example:
      >>> import numpy as np
      >>> depthwise = Layer("dw", "dw/kernel", 2, 3, "conv", (0, 1, 2), (3, 4, 5), groups=3)
      >>> kernel_by_input(np.arange(3.0).reshape(1, 1, 1, 3), depthwise)[0, 0].tolist()
      [[0.0], [1.0], [2.0]]
    """
    xp = jnp if isinstance(kernel, jax.Array) else np
    shape = tuple(kernel.shape)
    moved = xp.moveaxis(kernel, (layer.in_axis, layer.out_axis), (-2, -1))
    if moved.shape[-2:] != (layer.c_in // layer.groups, layer.c_out):
        raise UsageError(f"'{layer.kernel}' has shape {shape}, which does not fit the graph's "
                         f"{layer.c_in} -> {layer.c_out} channels"
                         + (f" in {layer.groups} groups" if layer.groups > 1 else ""))
    if moved.ndim < 3:
        moved = moved.reshape((1, *moved.shape))
    if layer.groups == 1:
        return moved
    g, spatial = layer.groups, moved.shape[:-2]
    per = moved.reshape(*spatial, layer.c_in // g, g, layer.c_out // g)  # (..., j, g, n)
    per = xp.moveaxis(per, -2, -3)  # (..., g, j, n)
    return per.reshape(*spatial, layer.c_in, layer.c_out // g)


def from_topology(topology: Topology, params: Mapping[str, Any],
                  batch_stats: Mapping[str, Any] | None = None) -> ChannelGraph:
    """The graph of a hand-written topology (checked with
    :func:`~tgd_jax.topology.validate_topology` first).

    Each conv's output channels are maps of their own, read by its ``consumer`` at offset
    0; a conv without a consumer writes maps that reach the output. Its bias, its
    BatchNorm's scale/offset and running statistics, and its gates' masks
    (``'tgd/<gate>/mask'``) are attached to its channels. Without ``batch_stats`` a
    BatchNorm's statistics are Flax's names, ``'batch_stats/<norm>/mean'`` and ``.../var``.

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> params = {"a": {"kernel": jnp.zeros((3, 3, 1, 2))},
      ...           "b": {"kernel": jnp.zeros((3, 3, 2, 1))}}
      >>> g = from_topology(sequential_topology(["a", "b"]), params)
      >>> [(layer.path, layer.in_maps, layer.out_maps) for layer in g.layers], g.outputs
      ([('a', (-1,), (0, 1)), ('b', (0, 1), (2,))], frozenset({2}))
    """
    counts = validate_topology(params, topology, batch_stats)
    first_id: dict[str, int] = {}
    next_id = 0
    for node in topology:
        first_id[node.conv] = next_id
        next_id += counts[node.conv]
    maps = {conv: tuple(range(first_id[conv], first_id[conv] + counts[conv]))
            for conv in counts}
    readers_of = {node.consumer: node.conv for node in topology if node.consumer is not None}
    layers = []
    leaves: dict[str, tuple[int, tuple[int, ...]]] = {}
    for node in topology:
        kernel = get_path(params, f"{node.conv}/kernel")
        source = readers_of.get(node.conv)
        in_maps = maps[source] if source is not None else (-1,) * int(kernel.shape[-2])
        layers.append(Layer(path=node.conv, kernel=f"{node.conv}/kernel",
                            in_axis=kernel.ndim - 2, out_axis=kernel.ndim - 1, kind="conv",
                            in_maps=tuple(in_maps), out_maps=maps[node.conv]))
        own = maps[node.conv]
        if has_path(params, f"{node.conv}/bias"):
            leaves[f"{PARAMS}/{node.conv}/bias"] = (0, own)
        if node.norm is not None:
            for leaf in ("scale", "bias"):
                if has_path(params, f"{node.norm}/{leaf}"):
                    leaves[f"{PARAMS}/{node.norm}/{leaf}"] = (0, own)
            if batch_stats is None:  # named by the topology: Flax BatchNorm's statistics
                statistics: Any = _BATCHNORM_STATISTICS
            else:
                statistics = (get_path(batch_stats, node.norm)
                              if has_path(batch_stats, node.norm) else ())
            for leaf in statistics:
                leaves[f"batch_stats/{node.norm}/{leaf}"] = (0, own)
        for gate in node.gates:
            leaves[f"tgd/{gate}/mask"] = (0, own)
    outputs = frozenset(m for node in topology if node.consumer is None for m in maps[node.conv])
    kernels = {layer.kernel for layer in layers}
    other = tuple(f"{PARAMS}/{path}" for path in _leaf_paths(params)
                  if path not in kernels and f"{PARAMS}/{path}" not in leaves)
    return ChannelGraph(layers=tuple(layers), leaves=leaves, outputs=outputs, other=other)


#: The running statistics of a Flax ``BatchNorm`` (``batch_stats/<module>/<name>``).
_BATCHNORM_STATISTICS = ("mean", "var")


def as_graph(topology: Topology | ChannelGraph, params: Mapping[str, Any] | None = None,
             batch_stats: Mapping[str, Any] | None = None, *,
             channels: Mapping[str, Any] | None = None) -> ChannelGraph:
    """The one conversion into the core's graph type: ``topology`` itself if it is a graph,
    else :func:`from_topology`.

    A hand-written topology's channel counts come from ``params``; without them, from
    ``channels`` (conv path -> its ``(C_out,)`` channel mask), which is all that gates
    and BatchNorm modes need (the first conv's input channels are then one unknown map).

    Raises:
      UsageError: a hand-written topology with neither ``params`` nor ``channels``, or
        ``channels`` that miss one of its convs.

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> params = {"a": {"kernel": jnp.zeros((1, 1, 1, 2))}}
      >>> graph = as_graph(sequential_topology(["a"]), params)
      >>> as_graph(graph, params) is graph
      True
      >>> as_graph(sequential_topology(["a"]), channels={"a": [True, False]}).layers[0].out_maps
      (0, 1)
    """
    if isinstance(topology, ChannelGraph):
        return topology
    if params is None:
        if channels is None:
            raise UsageError("a hand-written topology needs params (its channel counts) to "
                             "become a graph")
        params = _shapes_from_channels(topology, channels)
    return from_topology(topology, params, batch_stats)


def _shapes_from_channels(topology: Topology, channels: Mapping[str, Any]) -> dict[str, Any]:
    """Stand-in params (shapes only) with the channel counts of per-conv channel masks."""
    missing = [node.conv for node in topology if node.conv not in channels]
    if missing:
        raise UsageError(f"channels have no mask for the topology's conv(s) {missing}")
    count = {node.conv: int(np.size(channels[node.conv])) for node in topology}
    source = {node.consumer: node.conv for node in topology if node.consumer is not None}
    flat: dict[str, Any] = {}
    for node in topology:
        c_in = count[source[node.conv]] if node.conv in source else 1
        flat[f"{node.conv}/kernel"] = jax.ShapeDtypeStruct((1, 1, c_in, count[node.conv]),
                                                           jnp.float32)
        if node.norm is not None:
            flat[f"{node.norm}/scale"] = jax.ShapeDtypeStruct((count[node.conv],), jnp.float32)
    return unflatten_paths(flat)


def _leaf_paths(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, Mapping):
        return [prefix.rstrip("/")]
    out: list[str] = []
    for key, value in tree.items():
        out += _leaf_paths(value, f"{prefix}{key}/")
    return out


def key_name(k: Any) -> str | None:
    """One pytree key as a path component (None for an NNX Variable's ``.value``).

    Example:
      >>> import jax
      >>> key_name(jax.tree_util.DictKey(0)), key_name(jax.tree_util.GetAttrKey("value"))
      ('0', None)
    """
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return None if k.name in ("value", "raw_value") else k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def _join(path: Any) -> str:
    return "/".join(name for name in map(key_name, path) if name is not None)


def flat_paths(tree: Any, *, none_leaves: bool = False) -> dict[str, Any]:
    """``'/'``-joined path -> leaf, for any pytree (dicts, FrozenDicts, NNX states with
    integer keys); with ``none_leaves`` None leaves are kept (mask trees).

    Example:
      >>> flat_paths({"blocks": [{"w": 1.0}], "b": None}, none_leaves=True)
      {'b': None, 'blocks/0/w': 1.0}
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=(lambda x: x is None) if none_leaves else None)
    return {_join(path): leaf for path, leaf in leaves}


def map_with_paths(fn: Any, tree: Any) -> Any:
    """``tree`` with each leaf replaced by ``fn(path, leaf)`` (the same pytree type, so a
    mask made from an NNX ``State`` is a ``State`` again).

    Example:
      >>> map_with_paths(lambda path, x: path, {"a": {"b": 0}})
      {'a': {'b': 'a/b'}}
    """
    return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(_join(path), leaf), tree)


def unflatten_paths(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``'/'``-joined paths -> nested dicts (the inverse of :func:`flat_paths` for dicts).

    Example:
      >>> unflatten_paths({"enc/bn": 1, "bn2": 2})
      {'enc': {'bn': 1}, 'bn2': 2}
    """
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out
