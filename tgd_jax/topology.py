"""Which parameters belong to which feature map: the wiring TGD needs from a ConvNet.

TGD rates feature map ``n`` (output channel ``n`` of a conv layer) by the KSE of input
channel ``n`` of the conv that reads it, and then retrains or freezes everything that makes
that feature map: the conv's filter ``n``, its bias, and the BatchNorm scale/offset (and
running statistics) of channel ``n``. A :class:`ConvNode` records those relations for one
conv layer; a topology is the tuple of nodes of a network, in forward order.

Module paths are ``'/'``-joined names inside the Flax ``params`` dict, e.g. ``'conv2'`` or
``'encoder/block_0/conv'``, so topologies are plain data (JSON-friendly, hashable).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from tgd_jax.errors import TGDWarning, UsageError

__all__ = [
    "ConvNode",
    "Topology",
    "sequential_topology",
    "dncnn_topology",
    "get_path",
    "has_path",
    "validate_topology",
    "conv_paths",
]


@dataclasses.dataclass(frozen=True)
class ConvNode:
    """One conv layer of a network, as TGD sees it.

    Attributes:
      conv: path of the conv module; its ``kernel`` is ``(*spatial, C_in, C_out)`` and its
        optional ``bias`` is ``(C_out,)``.
      consumer: path of the conv that reads this layer's output channels as its input
        channels (its KSE rates them), or ``None`` for the last layer.
      norm: path of the BatchNorm module normalising this layer's output channels, if any
        (its ``scale``/``bias`` params and ``mean``/``var`` statistics are per channel).
      gates: paths of the TGD gate modules that carry this layer's output-channel mask in
        the ``"tgd"`` variable collection (see :mod:`tgd_jax.gate`).

    Example:
      >>> ConvNode("conv2", consumer="conv3", norm="bn2").to_dict()
      {'conv': 'conv2', 'consumer': 'conv3', 'norm': 'bn2', 'gates': ()}
    """

    conv: str
    consumer: str | None = None
    norm: str | None = None
    gates: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: A hand-written topology: the :class:`ConvNode` of each conv, in forward order.
Topology = tuple[ConvNode, ...]


def sequential_topology(
    convs: Sequence[str],
    norms: Mapping[str, str] | None = None,
    gates: Mapping[str, Sequence[str]] | None = None,
) -> Topology:
    """Topology of a plain sequential conv stack: each conv feeds the next one.

    Args:
      convs: conv module paths in forward order.
      norms: conv path -> path of the BatchNorm that follows it (omit convs without one).
      gates: conv path -> paths of the TGD gates carrying its output-channel mask.

    A conv left out of ``convs`` cannot be noticed here (its neighbours would look
    connected whenever their channel counts match); :func:`validate_topology` checks the
    list against the params' conv kernels.

    Example:
      >>> topology = sequential_topology(["stem", "body/conv_0", "head"],
      ...                                norms={"body/conv_0": "body/bn_0"})
      >>> [(node.conv, node.consumer, node.norm) for node in topology]
      [('stem', 'body/conv_0', None), ('body/conv_0', 'head', 'body/bn_0'), ('head', None, None)]
    """
    convs = list(convs)
    if not convs:
        raise UsageError("a topology needs at least one conv layer")
    if len(set(convs)) != len(convs):
        raise UsageError(f"conv names must be unique, got {convs}")
    norms = dict(norms or {})
    gates = {key: tuple(value) for key, value in (gates or {}).items()}
    for name, mapping in (("norms", norms), ("gates", gates)):
        unknown = sorted(set(mapping) - set(convs))
        if unknown:
            raise UsageError(f"{name} names convs that are not in the stack: {unknown}")
    return tuple(
        ConvNode(
            conv=name,
            consumer=convs[i + 1] if i + 1 < len(convs) else None,
            norm=norms.get(name),
            gates=gates.get(name, ()),
        )
        for i, name in enumerate(convs)
    )


def dncnn_topology(num_layers: int = 8, gates: bool = True) -> Topology:
    """Topology of :class:`tgd_jax.pet.models.DnCNN`: ``conv1 .. conv{L}``, ``bn2 .. bn{L-1}``.

    With ``gates`` (a DnCNN built with ``use_gates=True``), gates ``gate_conv{i}`` and
    ``gate_bn{i}`` sit after every conv and BatchNorm except the last conv, whose
    cotangent must reach the rest of the network.

    Example:
      >>> topology = dncnn_topology(4)
      >>> [node.conv for node in topology], topology[1].norm, topology[1].gates
      (['conv1', 'conv2', 'conv3', 'conv4'], 'bn2', ('gate_conv2', 'gate_bn2'))
      >>> dncnn_topology(4, gates=False)[1].gates
      ()
    """
    if num_layers < 2:
        raise UsageError(f"a DnCNN has at least 2 conv layers, got {num_layers}")
    convs = [f"conv{i}" for i in range(1, num_layers + 1)]
    norms = {f"conv{i}": f"bn{i}" for i in range(2, num_layers)}
    named = {
        f"conv{i}": (f"gate_conv{i}",) + ((f"gate_bn{i}",) if i > 1 else ())
        for i in range(1, num_layers)
    }
    return sequential_topology(convs, norms, named if gates else None)


def _split(path: str) -> tuple[str, ...]:
    return tuple(part for part in path.split("/") if part)


def has_path(tree: Mapping[str, Any], path: str) -> bool:
    """Whether ``tree['a']['b']`` exists for ``path='a/b'``.

    Example:
      >>> has_path({"a": {"b": 1}}, "a/b"), has_path({"a": {"b": 1}}, "a/c")
      (True, False)
    """
    node: Any = tree
    for key in _split(path):
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def get_path(tree: Mapping[str, Any], path: str) -> Any:
    """``tree['a']['b']`` for ``path='a/b'``; a KeyError names the missing part.

    Example:
      >>> get_path({"encoder": {"conv": {"bias": 0.5}}}, "encoder/conv/bias")
      0.5
    """
    node: Any = tree
    walked: list[str] = []
    for key in _split(path):
        if not isinstance(node, Mapping) or key not in node:
            where = "/".join(walked) or "<root>"
            available = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise KeyError(f"no '{key}' under '{where}' (path '{path}'); found {available}")
        walked.append(key)
        node = node[key]
    return node


def validate_topology(params: Mapping[str, Any], topology: Topology,
                      batch_stats: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Checks a topology against the params (and BatchNorm statistics, when given).

    Every named layer must exist, channel counts must agree between a conv, its bias, its
    BatchNorm and its consumer, and EVERY conv kernel in ``params`` (a leaf named
    ``kernel`` with 3 or more dimensions) must be named by the topology: a conv left out of
    a :func:`sequential_topology` list would make its two neighbours look connected
    whenever their channel counts happen to match. List a conv that no other conv reads
    directly with ``consumer=None`` (it then follows the ``last`` policy).

    Returns:
      conv path -> its number of output channels ``C_out``.

    Raises:
      UsageError: naming the missing or unlisted layer or leaf, or the mismatching shapes.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"a": {"kernel": jnp.zeros((3, 3, 1, 4))},
      ...           "b": {"kernel": jnp.zeros((3, 3, 4, 2))}}
      >>> validate_topology(params, sequential_topology(["a", "b"]))
      {'a': 4, 'b': 2}
      >>> validate_topology(params, sequential_topology(["a"]))
      Traceback (most recent call last):
      ...
      tgd_jax.errors.UsageError: params have conv kernels the topology does not name: ['b']; ...
    """
    if not topology:
        raise UsageError("empty topology")
    names = [node.conv for node in topology]
    if len(set(names)) != len(names):
        raise UsageError(f"conv names must be unique, got {names}")
    fed: dict[str, str] = {}
    for node in topology:
        if node.consumer is not None and fed.setdefault(node.consumer, node.conv) != node.conv:
            raise UsageError(
                f"'{fed[node.consumer]}' and '{node.conv}' both name '{node.consumer}' as "
                "their consumer: a hand-written topology is a chain (one producer per "
                "conv); for adds and concatenations trace the model "
                "(tgd_jax.trace_topology)")
    counts: dict[str, int] = {}
    for node in topology:
        c_out = counts[node.conv] = int(_kernel(params, node.conv).shape[-1])
        if has_path(params, f"{node.conv}/bias"):
            _expect_channels(params, f"{node.conv}/bias", c_out)
        if node.consumer is not None:
            c_in = _kernel(params, node.consumer).shape[-2]
            if c_in != c_out:
                raise UsageError(
                    f"'{node.conv}' has {c_out} output channels but its consumer "
                    f"'{node.consumer}' reads {c_in} input channels"
                )
        if node.norm is not None:
            in_stats = batch_stats is not None and has_path(batch_stats, node.norm)
            if not (has_path(params, node.norm) or in_stats):
                raise UsageError(
                    f"topology names BatchNorm '{node.norm}', not found in params" + (
                        " or batch_stats" if batch_stats is not None else
                        " (a BatchNorm without scale and offset has only statistics: pass "
                        "batch_stats)"))
            for leaf in ("scale", "bias"):
                if has_path(params, f"{node.norm}/{leaf}"):
                    _expect_channels(params, f"{node.norm}/{leaf}", c_out)
            if in_stats:
                for leaf in get_path(batch_stats, node.norm):
                    _expect_channels(batch_stats, f"{node.norm}/{leaf}", c_out)
    unlisted = sorted(set(conv_paths(params)) - set(names))
    if unlisted:
        raise UsageError(
            f"params have conv kernels the topology does not name: {unlisted}; a conv left "
            "out of the list would make its neighbours look connected. Name every conv "
            "(one no other conv reads gets consumer=None)")
    _warn_out_of_order(params, topology)
    return counts


def _natural(path: str) -> list[Any]:
    """Sort key reading digit runs as numbers: ``conv2`` before ``conv10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def _warn_out_of_order(params: Mapping[str, Any], topology: Topology) -> None:
    """A chain (``consumer`` links) listed against both orders the params suggest (the
    order Flax created the kernels in, and the names' natural order) most likely swaps
    layers: equal-width layers swapped pass every shape check and give a wrong graph."""
    order = {path: i for i, path in enumerate(conv_paths(params))}
    links = [(node.conv, node.consumer) for node in topology if node.consumer is not None]
    against_params = [(a, b) for a, b in links if order[a] > order[b]]
    against_names = [(a, b) for a, b in links if _natural(a) > _natural(b)]
    if against_params and against_names:
        a, b = against_params[0]
        warnings.warn(
            f"the topology has '{a}' feeding '{b}', but the params hold '{b}' before '{a}' "
            "and the names sort the other way too: list a sequential stack in forward "
            "order (or use trace_topology, which reads the wiring off the model)",
            TGDWarning, stacklevel=3)


def conv_paths(params: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Paths of every module in ``params`` with a ``kernel`` of 3 or more dimensions.

    Example:
      >>> import jax.numpy as jnp
      >>> conv_paths({"enc": {"conv": {"kernel": jnp.zeros((3, 3, 1, 2))}},
      ...             "head": {"kernel": jnp.zeros((2, 1))}})  # a dense kernel is not a conv
      ['enc/conv']
    """
    out = []
    for key, value in params.items():
        if not isinstance(value, Mapping):
            continue
        path = f"{prefix}{key}"
        kernel = value.get("kernel")
        if kernel is not None and not isinstance(kernel, Mapping) and len(kernel.shape) >= 3:
            out.append(path)
        out += conv_paths(value, f"{path}/")
    return out


def _kernel(params: Mapping[str, Any], conv: str) -> Any:
    if not has_path(params, f"{conv}/kernel"):
        raise UsageError(f"topology names conv '{conv}', but params have no '{conv}/kernel'")
    kernel = get_path(params, f"{conv}/kernel")
    if kernel.ndim < 3:
        raise UsageError(
            f"'{conv}/kernel' has shape {tuple(kernel.shape)}; a conv kernel is "
            "(*spatial, C_in, C_out)"
        )
    return kernel


def _expect_channels(params: Mapping[str, Any], path: str, channels: int) -> None:
    shape = tuple(get_path(params, path).shape)
    if shape != (channels,):
        raise UsageError(f"'{path}' has shape {shape}, expected ({channels},)")
