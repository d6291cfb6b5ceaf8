"""From params to TGD mask pytrees (which elements are retrained, which stay frozen).

Conventions:

* A **channel mask** is a ``(C_out,)`` bool array per conv layer (keyed by its path):
  ``True`` = output channel (feature map) is retrained, ``False`` = frozen.
* A **mask pytree** mirrors the ``params`` pytree. Its leaves are bool arrays that broadcast
  against the parameter: ``(1, ..., 1, C_out)`` for a conv kernel, ``(C_out,)`` for a bias
  and for a BatchNorm ``scale``/``bias``. A leaf no rule touches is ``None``, and
  **``None`` means frozen**: TGD changes only what a mask explicitly marks retrainable (to
  train a whole extra leaf, e.g. a user's dense head, set it to ``jnp.ones((), bool)``).

The TGD rule (docs/method.md, section 4): output channel ``n`` of a conv (its whole filter, its
bias, its BatchNorm scale and offset) is retrainable iff the KSE of input channel ``n`` of the
conv that consumes it is ``< phi``. Layers without a consumer (the DnCNN's last conv, the
"noise classifier") follow ``last`` (default ``"frozen"``, as in the paper). The first conv
follows ``first``: ``"kse"`` (default: the same rule as every other layer, so no kernel the
rule calls useful is ever retrained), ``"frozen"`` or ``"train"``; the paper's figure shows
TGD layers on conv2..conv7 only and leaves this open.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tgd_jax import kse as kse_lib
from tgd_jax.topology import ConvNode, Topology, get_path, has_path, validate_topology

__all__ = [
    "LayerPolicy",
    "layer_scores",
    "channel_masks_from_scores",
    "expand_channel_masks",
    "gate_variables",
    "FROZEN_BN_COLLECTION",
    "BN_MODES",
    "frozen_bn_flag",
    "running_channels",
    "frozen_bn_variables",
    "statistics_mask",
    "keep_frozen",
    "layer_leaves",
    "mask_summary",
    "drop_kernels",
    "check_phi",
    "check_mode",
    "Mode",
    "MODES",
]

LayerPolicy = Literal["kse", "frozen", "train"]
#: "paper": TGD gates mask the cotangents AND the optax mask freezes updates (the paper).
#: "projected": only the optax mask acts (projected gradient; earlier layers still receive
#: gradient through frozen channels).
Mode = Literal["paper", "projected"]
MODES: tuple[str, ...] = ("paper", "projected")
Params = Mapping[str, Any]
ChannelMasks = dict[str, jax.Array]


def check_phi(phi: float) -> float:
    """``phi`` as a float, or a ValueError if it is not a KSE threshold in [0, 1].

    Example:
      >>> check_phi(0.3)
      0.3
    """
    phi = float(phi)
    if not 0.0 <= phi <= 1.0:  # also rejects NaN
        raise ValueError(f"KSE threshold phi must be in [0, 1] (KSE is normalised), got {phi}")
    return phi


def layer_scores(
    params: Params, topology: Topology, *, alpha: float = 1.0, k: int = 5,
    batch_stats: Params | None = None,
) -> dict[str, jax.Array]:
    """KSE of each layer's OUTPUT channels, computed on the kernel of the consuming conv.

    ``batch_stats`` (here and in the functions below) lets the topology name a BatchNorm
    that has statistics but no params (no scale and offset).

    Returns:
      conv path -> ``(C_out,)`` scores in [0, 1], for every node that has a consumer.

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
    validate_topology(params, topology, batch_stats)
    return {
        node.conv: kse_lib.kse_scores(get_path(params, f"{node.consumer}/kernel"), alpha=alpha, k=k)
        for node in topology
        if node.consumer is not None
    }


def channel_masks_from_scores(
    params: Params,
    topology: Topology,
    scores: Mapping[str, jax.Array],
    phi: float,
    *,
    first: LayerPolicy = "kse",
    last: Literal["frozen", "train"] = "frozen",
    batch_stats: Params | None = None,
) -> ChannelMasks:
    """Applies the threshold and the first/last-layer policies: conv path -> ``(C_out,)`` bool.

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
    counts = validate_topology(params, topology, batch_stats)
    phi = check_phi(phi)
    _check_policy("first", first, ("kse", "frozen", "train"))
    _check_policy("last", last, ("frozen", "train"))
    masks: ChannelMasks = {}
    for i, node in enumerate(topology):
        c_out = counts[node.conv]
        policy = last if node.consumer is None else first if i == 0 else "kse"
        if policy == "kse":
            if node.conv not in scores:
                raise ValueError(f"no KSE scores for layer '{node.conv}'")
            score = jnp.asarray(scores[node.conv])
            if score.shape != (c_out,):
                raise ValueError(
                    f"scores for '{node.conv}' have shape {score.shape}, expected ({c_out},)"
                )
            masks[node.conv] = score < phi
        else:
            masks[node.conv] = jnp.full((c_out,), policy == "train")
    return masks


def layer_leaves(params: Params, node: ConvNode) -> list[str]:
    """Paths of the param leaves indexed by ``node``'s output channels (those that exist).

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.topology import ConvNode
      >>> params = {"a": {"kernel": jnp.zeros((3, 3, 1, 2)), "bias": jnp.zeros(2)},
      ...           "bn": {"scale": jnp.ones(2)}}
      >>> layer_leaves(params, ConvNode("a", norm="bn"))
      ['a/kernel', 'a/bias', 'bn/scale']
    """
    return [path for path in _leaf_paths(node) if has_path(params, path)]


def _leaf_paths(node: ConvNode) -> list[str]:
    """Every leaf a node's output channels may own: conv kernel and bias, BN scale and bias."""
    candidates = [f"{node.conv}/kernel", f"{node.conv}/bias"]
    if node.norm is not None:
        candidates += [f"{node.norm}/scale", f"{node.norm}/bias"]
    return candidates


def expand_channel_masks(params: Params, topology: Topology, channels: Mapping[str, Any],
                         batch_stats: Params | None = None) -> Any:
    """Channel masks -> mask pytree mirroring ``params`` (leaves no layer owns are None).

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
    validate_topology(params, topology, batch_stats)
    flat = traverse_util.flatten_dict(_as_dict(params), sep="/")
    mask: dict[str, Any] = dict.fromkeys(flat)
    for node in topology:
        if node.conv not in channels:
            raise ValueError(f"no channel mask for layer '{node.conv}'")
        channel = jnp.asarray(channels[node.conv], bool)
        c_out = flat[f"{node.conv}/kernel"].shape[-1]
        if channel.shape != (c_out,):
            raise ValueError(
                f"channel mask for '{node.conv}' has shape {channel.shape}, expected ({c_out},)"
            )
        for path in _leaf_paths(node):
            if path in flat:
                mask[path] = jnp.reshape(channel, (1,) * (flat[path].ndim - 1) + (c_out,))
    return traverse_util.unflatten_dict(mask, sep="/")


def check_mode(mode: str) -> str:
    """``mode`` itself, or a ValueError naming :data:`MODES` if it is not one of them.

    Example:
      >>> check_mode("projected")
      'projected'
    """
    if mode not in MODES:
        raise ValueError(f"TGD mode must be one of {MODES}, got {mode!r}")
    return mode


def gate_variables(
    topology: Topology,
    channels: Mapping[str, Any],
    mode: Mode = "paper",
) -> dict[str, Any]:
    """The ``"tgd"`` variable collection read by :class:`tgd_jax.gate.TGDGate` modules.

    In ``"paper"`` mode each gate carries its layer's channel mask, except gates of layers
    without a consumer: masking the last layer's cotangent would stop every gradient, so
    those stay open and the layer is frozen by the optax mask alone. In ``"projected"``
    mode every gate is open (all ones) and only the optax mask acts.

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
    flat: dict[str, Any] = {}
    for node in topology:
        if not node.gates:
            continue
        channel = jnp.asarray(channels[node.conv], bool)
        if mode == "projected" or node.consumer is None:
            channel = jnp.ones_like(channel)
        for gate in node.gates:
            flat[f"{gate}/mask"] = channel
    return traverse_util.unflatten_dict(flat, sep="/")


#: Flax variable collection of per-channel "normalise with the running statistics in
#: training passes" flags, one ``(C,)`` bool entry per BatchNorm (see :data:`BN_MODES`).
FROZEN_BN_COLLECTION = "frozen_bn"
#: How a BatchNorm channel normalises in training passes: with the batch's statistics
#: (``"batch"``, which also updates its running statistics) or with its running statistics
#: (``"running"``, as at inference; they then stay as they are).
BN_MODES: tuple[str, ...] = ("batch", "running")


def frozen_bn_flag(norm: str) -> str:
    """Name of BatchNorm module ``norm``'s entry in :data:`FROZEN_BN_COLLECTION`.

    Example:
      >>> frozen_bn_flag("bn2")
      'bn2_use_running'
    """
    return f"{norm}_use_running"


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
            raise ValueError(f"{name} must be one of {BN_MODES}, got {value!r}")
    channels = np.asarray(channels, bool)
    return (~channels & (frozen_bn == "running")) | (channels & (retrained_bn == "running"))


def frozen_bn_variables(topology: Topology, channels: Mapping[str, Any], *,
                        frozen_bn: str = "running", retrained_bn: str = "batch"
                        ) -> dict[str, Any]:
    """The :data:`FROZEN_BN_COLLECTION`: per BatchNorm, the channels that normalise with
    their running statistics while training (:func:`running_channels`); ``{}`` when none
    does (every BatchNorm then behaves as usual).

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> topology = sequential_topology(["a", "b"], norms={"a": "bn_a"})
      >>> flags = frozen_bn_variables(topology, {"a": jnp.array([True, False])})
      >>> flags["bn_a_use_running"].tolist()
      [False, True]
    """
    flags = {frozen_bn_flag(node.norm): running_channels(
        channels[node.conv], frozen_bn=frozen_bn, retrained_bn=retrained_bn)
        for node in topology if node.norm is not None}
    return flags if any(flag.any() for flag in flags.values()) else {}


def statistics_mask(batch_stats: Params, topology: Topology, channels: Mapping[str, Any],
                    running: Mapping[str, Any] | None = None) -> Any:
    """Which running statistics a training pass may change: a mask mirroring ``batch_stats``.

    A BatchNorm's ``(C,)`` statistics (``mean``, ``var``) follow its layer's channel mask:
    True for a retrained channel that normalises with batch statistics, False for a frozen
    one and for one that normalises with its running statistics (``running``: norm path
    -> ``(C,)`` bool, see :func:`running_channels`). Statistics of modules no layer names
    are None (kept).

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> topology = sequential_topology(["a", "b"], norms={"a": "bn"})
      >>> stats = {"bn": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}
      >>> statistics_mask(stats, topology, {"a": jnp.array([True, False])})["bn"]["var"].tolist()
      [True, False]
    """
    flat = traverse_util.flatten_dict(_as_dict(batch_stats), sep="/")
    out: dict[str, Any] = dict.fromkeys(flat)
    for node in topology:
        if node.norm is None:
            continue
        channel = np.asarray(channels[node.conv], bool)
        if running is not None and node.norm in running:
            channel = channel & ~np.asarray(running[node.norm], bool)
        for path, value in flat.items():
            if path.rsplit("/", 1)[0] == node.norm:
                if np.shape(value) != channel.shape:
                    raise ValueError(f"batch_stats '{path}' has shape {np.shape(value)}, "
                                     f"expected {channel.shape} (the channels of "
                                     f"'{node.conv}')")
                out[path] = jnp.asarray(channel)
    return traverse_util.unflatten_dict(out, sep="/") if out else {}


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
    topology: Topology,
    *,
    scores: Mapping[str, Any] | None = None,
    phi: float | None = None,
) -> dict[str, Any]:
    """Per-layer and total counts of retrained channels and parameters (JSON-serialisable).

    Returns a dict with ``layers`` (one entry per conv: channels and parameters retrained
    and in total, the KSE values if given), ``params_retrained``, ``params_total`` and
    ``retrained_fraction`` over ALL parameters of the network (leaves outside the topology
    count as frozen unless their mask says otherwise).

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> params = {"a": {"kernel": jnp.zeros((3, 3, 1, 2)), "bias": jnp.zeros(2)}}
      >>> mask = {"a": {"kernel": jnp.array([[[[True, False]]]]), "bias": jnp.array([True, False])}}
      >>> s = mask_summary(params, mask, sequential_topology(["a"]))
      >>> s["params_retrained"], s["params_total"], s["layers"][0]["channels_retrained"]
      (10, 20, 1)
    """
    flat_params = traverse_util.flatten_dict(_as_dict(params), sep="/")
    flat_mask = _flat_mask(mask, flat_params)
    counts = {
        path: int(np.broadcast_to(np.asarray(m), flat_params[path].shape).sum())
        if m is not None
        else 0
        for path, m in flat_mask.items()
    }
    layers = []
    for node in topology:
        leaves = layer_leaves(params, node)
        kernel_mask = flat_mask[f"{node.conv}/kernel"]
        shape = flat_params[f"{node.conv}/kernel"].shape
        c_out = shape[-1]
        channels = 0 if kernel_mask is None else int(
            np.broadcast_to(kernel_mask, shape).reshape(-1, c_out).any(axis=0).sum()
        )
        entry: dict[str, Any] = {
            "layer": node.conv,
            "consumer": node.consumer,
            "channels_total": int(c_out),
            "channels_retrained": channels,
            "params_total": int(sum(flat_params[p].size for p in leaves)),
            "params_retrained": int(sum(counts[p] for p in leaves)),
        }
        if scores is not None and node.conv in scores:
            entry["kse"] = [float(v) for v in np.asarray(scores[node.conv])]
        layers.append(entry)
    total = int(sum(p.size for p in flat_params.values()))
    retrained = int(sum(counts.values()))
    return {
        "phi": None if phi is None else float(phi),
        "layers": layers,
        "params_total": total,
        "params_retrained": retrained,
        "retrained_fraction": retrained / total if total else 0.0,
    }


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
    flat_mask = traverse_util.flatten_dict(_as_dict(mask), sep="/")
    missing = sorted(set(flat_params) - set(flat_mask))
    extra = sorted(set(flat_mask) - set(flat_params))
    if missing or extra:
        raise ValueError(f"mask does not mirror params: missing {missing}, extra {extra}")
    for path, m in flat_mask.items():
        if m is None:
            continue
        try:
            np.broadcast_shapes(np.shape(m), flat_params[path].shape)
        except ValueError:
            raise ValueError(
                f"mask leaf '{path}' has shape {np.shape(m)}, which does not broadcast "
                f"to the parameter's shape {flat_params[path].shape}"
            ) from None
    return flat_mask


def _as_dict(tree: Any) -> Any:
    """Flax FrozenDicts (older flax) -> plain nested dicts."""
    if isinstance(tree, Mapping):
        return {key: _as_dict(value) for key, value in tree.items()}
    return tree


def _check_policy(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}-layer policy must be one of {allowed}, got {value!r}")
