"""One fine-tuning decision, one value: :class:`TGDPlan`, made by TGD or a baseline.

* ``tgd``: channels whose KSE (rated in the consumer layer) is below ``phi`` (the paper).
* ``last_k``: the paper's FT-net: the last ``k`` conv blocks (conv + BatchNorm), whole.
* ``full``: every weight (plain fine-tuning; no mask).
* ``random``: per layer, as MANY channels as TGD would retrain, chosen uniformly at random.
* ``l1``: per layer, as many channels as TGD, those whose filter has the lowest L1 norm
  (the filter-pruning criterion of Li et al. 2017: ``sum |W[..., n]|`` over the filter n).
* ``packnet``: the nearest published method (PackNet, Mallya and Lazebnik 2018): per
  layer, the fraction ``packnet_fraction`` of kernel weights with the smallest magnitude
  is freed (re-initialise them with :func:`reinitialize`) and only those are trained; every
  other parameter and statistic stays frozen.

``random`` and ``l1`` differ from ``tgd`` only in the choice of channels (same counts, same
first/last-layer policies, same gates in ``paper`` mode), so they isolate what KSE adds.

The decision itself is the per-layer channel mask; everything a training run needs is
derived from it once, here, and travels in the plan: the params mask for the optimizer
(:meth:`TGDPlan.optimizer`), the gate collection for the gated backward pass, the
frozen-BatchNorm collection, and the JSON record (:meth:`TGDPlan.to_json`). The runtime
takes the plan whole (``tgd_jax.train.step.create_train_state(..., plan=plan)``) and swaps it
whole between TGD rounds (``tgd_jax.train.step.replace_plan``).
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tgd_jax import masks as masks_lib
from tgd_jax import optim
from tgd_jax.errors import TGDWarning, UsageError
from tgd_jax.graph import (
    PARAMS,
    ChannelGraph,
    as_graph,
    flat_paths,
    map_with_paths,
    unflatten_paths,
)
from tgd_jax.topology import Topology

__all__ = ["METHODS", "FROZEN_BN", "TGDPlan", "tgd_plan", "plan_finetune", "check_variables",
           "reinitialize"]

#: The fine-tuning methods :func:`plan_finetune` makes plans for.
METHODS = ("tgd", "last_k", "full", "random", "l1", "packnet")
#: How the BatchNorm channels of a fine-tuning run normalise in training passes (the
#: ``frozen_bn`` and ``retrained_bn`` options): see :data:`tgd_jax.masks.BN_MODES`.
FROZEN_BN = masks_lib.BN_MODES


@dataclasses.dataclass(frozen=True)
class TGDPlan:
    """Which elements of a network a fine-tuning run retrains, in every form the run needs.

    Attributes:
      method: one of :data:`METHODS`.
      channels: conv path -> ``(C_out,)`` bool, True = output channel retrained. This is
        the decision; the fields below are derived from it.
      mask: params mask pytree (bool leaves broadcastable to each parameter, None = frozen
        leaf), or None for ``full`` (nothing frozen).
      gates: paper mode's gates, ``{}`` in projected mode: the ``"tgd"`` collection of
        the model's :class:`tgd_jax.gate.TGDGate` modules, or (``auto_gates``) the values
        :func:`tgd_jax.autogate.gated_by` applies without any gate module.
      frozen_bn: which BatchNorm channels normalise with their running statistics in
        training passes: BatchNorm path (nested, as in ``batch_stats``) -> ``(C,)`` bool,
        applied by :func:`tgd_jax.batchnorm.running_statistics`; ``{}`` if none does.
      stats_mask: which running statistics a training pass may change, mirroring
        ``batch_stats`` (:func:`tgd_jax.masks.statistics_mask`); None when the plan was made
        without ``batch_stats``.
      scores: conv path -> ``(C_out,)`` KSE of its output channels (``tgd``/``random``/
        ``l1``), else ``{}``.
      summary: :func:`tgd_jax.masks.mask_summary` plus the method's settings (JSON).
      graph: the :class:`~tgd_jax.graph.ChannelGraph` the decision was made on.
      auto_gates: paper mode without gate modules: ``gates`` holds per-layer gate values
        (layer path -> ``(C_out,)`` bool) for :func:`tgd_jax.autogate.gated_by`, not a
        ``"tgd"`` collection.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from tgd_jax.topology import sequential_topology
      >>> params = {"a": {"kernel": jnp.ones((3, 3, 1, 2))},
      ...           "b": {"kernel": jnp.ones((3, 3, 2, 1))}}
      >>> plan = plan_finetune("last_k", params, sequential_topology(["a", "b"]), last_k=1)
      >>> {conv: m.tolist() for conv, m in plan.channels.items()}
      {'a': [False, False], 'b': [True]}
      >>> tx = plan.optimizer(optax.adam(1e-3))  # the mask rides in the optimizer state
      >>> plan.to_json()["channels"], plan.use_gates
      ({'a': [0, 0], 'b': [1]}, False)
    """

    method: str
    channels: dict[str, Any]
    mask: Any
    gates: dict[str, Any]
    frozen_bn: dict[str, Any]
    stats_mask: Any
    scores: dict[str, Any]
    summary: dict[str, Any]
    graph: ChannelGraph | None = None
    auto_gates: bool = False

    @property
    def use_gates(self) -> bool:
        """Whether the model must carry TGD gates (paper mode)."""
        return bool(self.gates)

    def optimizer(self, inner: optax.GradientTransformation | None = None, *,
                  watch: bool = True,
                  **make_optimizer_kwargs: Any) -> optax.GradientTransformation:
        """The run's optimizer, restricted to the plan.

        ``plan.optimizer(inner)`` wraps any optax optimizer with :func:`tgd_jax.optim.tgd`
        (the mask on the gradient and on the update); ``plan.optimizer(num_steps=n,
        **config.optimizer)`` builds :func:`tgd_jax.optim.make_optimizer` with the mask,
        which also keeps the coupled L2 term of frozen kernels out of the clipping norm.
        ``full`` has no mask: the optimizer is unrestricted.

        In paper mode (``watch=True``) the optimizer also says, in one
        :class:`~tgd_jax.errors.TGDWarning`, when its gradients did not pass the gates
        (:func:`tgd_jax.optim.warn_if_ungated`): a loop that trains through a plain
        ``apply`` runs projected TGD. The watch puts a host callback in the step; pass
        ``watch=False`` in a loop known to apply the gates (the runtime's step does).
        """
        if inner is None:
            tx = optim.make_optimizer(mask=self.mask, **make_optimizer_kwargs)
        elif make_optimizer_kwargs:
            raise UsageError("pass either an optimizer or make_optimizer's keywords, not both")
        else:
            tx = inner if self.mask is None else optim.tgd(inner, self.mask)
        return self._watched(tx) if watch else tx

    def _watched(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """In paper mode: ``tx`` warning (once per call site) when its gradients did not
        pass the gates (:func:`tgd_jax.optim.warn_if_ungated`)."""
        if self.summary.get("mode") != "paper" or self.graph is None:
            return tx
        # a map's gate closes when it is frozen, unless no layer reads it or it is an
        # output (masks.layer_gate_values); which maps are frozen is the optimizer's mask
        reads, outputs = self.graph.reads(), self.graph.outputs
        gated = {layer.kernel: (layer.out_axis, np.array([m in reads and m not in outputs
                                                          for m in layer.out_maps]))
                 for layer in self.graph.layers}
        gated = {k: v for k, v in gated.items() if v[1].any()}

        def warn() -> None:
            warnings.warn(
                "mode='paper', but the gradients reaching the plan's optimizer did not pass "
                "the gates (a frozen map's filters got a gradient, or a NaN): the training "
                "pass runs as projected TGD. Call the model through "
                "tgd_jax.training_apply(apply, plan) (or tgd_jax.gated); a model with "
                "TGDGate modules needs plan.gates in its 'tgd' collection; or use "
                "mode='projected'", TGDWarning, stacklevel=2)

        return optim.warn_if_ungated(tx, gated, warn) if gated and self.mask is not None else tx

    def to_json(self) -> dict[str, Any]:
        """The summary plus the channel masks as 0/1 lists (what ``mask.json`` holds)."""
        return {**self.summary, "channels": {k: np.asarray(v).astype(int).tolist()
                                             for k, v in self.channels.items()}}


def tgd_plan(params: Any, topology: Topology | ChannelGraph, phi: float, *,
             alpha: float = 1.0, k: int = 5, first: str = "kse", last: str = "frozen",
             mode: str = "projected", frozen_bn: str = "running", retrained_bn: str = "batch",
             combine: str = "max", other: str = "frozen", readers: str = "none",
             batch_stats: Any = None, scores: Mapping[str, Any] | None = None) -> TGDPlan:
    """The TGD rule in one call: KSE scores, channel masks, params mask, gates.

    ``plan_finetune("tgd", ...)``; see there for the arguments.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> kernel = lambda key, c_in, c_out: jax.random.normal(key, (3, 3, c_in, c_out))
      >>> keys = jax.random.split(jax.random.key(0), 3)
      >>> params = {"a": {"kernel": kernel(keys[0], 1, 4)}, "b": {"kernel": kernel(keys[1], 4, 4)},
      ...           "c": {"kernel": kernel(keys[2], 4, 1)}}
      >>> plan = tgd_plan(params, sequential_topology(["a", "b", "c"]), phi=0.99)
      >>> plan.method, plan.mask["a"]["kernel"].shape, plan.channels["c"].tolist()
      ('tgd', (1, 1, 1, 4), [False])
      >>> plan.summary["params_retrained"] <= plan.summary["params_total"]
      True
    """
    return plan_finetune("tgd", params, topology, phi=phi, alpha=alpha, k=k, first=first,
                         last=last, mode=mode, frozen_bn=frozen_bn, retrained_bn=retrained_bn,
                         combine=combine, other=other, readers=readers,
                         batch_stats=batch_stats, scores=scores)


def plan_finetune(method: str, params: Any, topology: Topology | ChannelGraph, *,
                  phi: float = 0.3, alpha: float = 1.0, k: int = 5, first: str = "kse",
                  last: str = "frozen", mode: str = "projected", frozen_bn: str = "running",
                  retrained_bn: str = "batch", combine: str = "max", other: str = "frozen",
                  readers: str = "none", batch_stats: Any = None, last_k: int = 3,
                  key: jax.Array | None = None, packnet_fraction: float = 0.5,
                  scores: Mapping[str, Any] | None = None) -> TGDPlan:
    """The :class:`TGDPlan` of ``method`` for a network's ``params``.

    Args:
      method: one of :data:`METHODS`.
      params: the pretrained ``params`` (the pytree the optimizer trains: a Linen params
        dict, or an NNX ``State`` of ``nnx.Param``; the masks mirror its type).
      topology: the network's :class:`~tgd_jax.graph.ChannelGraph`
        (:func:`tgd_jax.trace_topology`), or a hand-written topology.
      phi: KSE threshold in [0, 1]; maps scoring below it are retrained (``tgd``,
        ``random``, ``l1``).
      alpha, k: KSE parameters (:func:`tgd_jax.kse.kse_scores`).
      first: policy of maps written only by layers that read the model's input:
        ``"kse"`` (the rule), ``"frozen"`` or ``"train"``.
      last: policy of maps no layer reads (the last layer's): ``"frozen"`` (the paper) or
        ``"train"``.
      mode: ``"projected"`` (the optax mask alone) or ``"paper"`` (also gate the backward
        pass: a graph with explicit gates, or :func:`tgd_jax.autogate.gated` around the
        model's apply function).
      frozen_bn, retrained_bn: how frozen / retrained BatchNorm channels normalise in
        training passes, one of :data:`FROZEN_BN`. The default, running statistics for
        frozen channels, trains the network that is evaluated: a frozen channel
        normalised with batch statistics in training keeps running statistics that no
        longer match its inputs once the retrained maps change (docs/method.md).
        ``retrained_bn="running"`` as well puts every BatchNorm in inference mode.
      combine: how a map read by several layers combines their scores, one of
        :data:`tgd_jax.masks.COMBINE`.
      other: policy of parameters that belong to no channel, ``"frozen"`` or ``"train"``
        (reported in the summary's ``other``).
      readers: also retrain the input slices of frozen filters that read retrained maps
        (:data:`tgd_jax.masks.READERS`: ``"none"``, ``"all"`` readers, or ``"last"``: only
        the last layers'), the path from the new maps into the kept network. Projected
        mode only: paper-mode gates stop the gradient of the frozen outputs they feed.
      packnet_fraction: the fraction of each kernel's weights ``packnet`` frees.
      batch_stats: the ``batch_stats`` (needed to train a network that has them: the plan
        then says which statistics may change, ``stats_mask``).
      last_k: layers fine-tuned by ``last_k`` (the last in forward order).
      key: PRNG key for ``random`` (required there).
      scores: precomputed :func:`tgd_jax.masks.layer_scores` of ``params`` (same alpha,
        k and combine), to try several thresholds without recomputing KSE.

    Raises:
      UsageError: an unknown method, mode, policy or BatchNorm mode; ``phi`` outside
        [0, 1]; a topology that does not match the params; ``mode="paper"`` with a hand
        topology that names no gates (it would silently train in projected mode).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 1, 8))},
      ...           "b": {"kernel": jax.random.normal(jax.random.key(1), (3, 3, 8, 1))}}
      >>> topology = sequential_topology(["a", "b"])
      >>> tgd = plan_finetune("tgd", params, topology, phi=0.5)
      >>> rnd = plan_finetune("random", params, topology, phi=0.5, key=jax.random.key(2))
      >>> int(tgd.channels["a"].sum()) == int(rnd.channels["a"].sum())  # same count, other maps
      True
    """
    if method not in METHODS:
        raise UsageError(f"unknown fine-tuning method {method!r}; choose one of {METHODS}")
    masks_lib.check_mode(mode)
    for name, value in (("frozen_bn", frozen_bn), ("retrained_bn", retrained_bn)):
        if value not in FROZEN_BN:
            raise UsageError(f"{name} must be one of {FROZEN_BN}, got {value!r}")
    for name, value, allowed in (("combine", combine, masks_lib.COMBINE),
                                 ("other", other, masks_lib.OTHER),
                                 ("readers", readers, masks_lib.READERS)):
        if value not in allowed:
            raise UsageError(f"{name} must be one of {allowed}, got {value!r}")
    if readers != "none" and mode == "paper" and method in ("tgd", "random", "l1"):
        raise UsageError("readers needs mode='projected': in paper mode the gates stop the "
                         "gradient of the frozen maps those input slices feed")
    hand = not isinstance(topology, ChannelGraph)
    graph = as_graph(topology, params, batch_stats)
    check_variables(graph, params, batch_stats)
    settings: dict[str, Any] = {"method": method}
    gates: dict[str, Any] = {}
    auto_gates = False
    used_scores: dict[str, Any] = {}
    if method in ("tgd", "random", "l1"):
        masks_lib.check_phi(phi)
        if mode == "paper" and hand and not any(node.gates for node in topology):
            raise UsageError("mode='paper' gates the backward pass, but the topology names no "
                             "TGD gates: build the model with TGDGate modules and list them "
                             "in ConvNode.gates, trace it, or use mode='projected'")
        used_scores = dict(scores if scores is not None else masks_lib.layer_scores(
            params, graph, alpha=alpha, k=k, combine=combine))
        channels = masks_lib.channel_masks_from_scores(params, graph, used_scores, phi,
                                                       first=first, last=last)
        if method == "random":
            if key is None:
                raise UsageError("method 'random' needs a PRNG key")
            channels = _same_counts(graph, channels, lambda i, maps, n: jax.random.permutation(
                jax.random.fold_in(key, i), n))
        elif method == "l1":
            l1 = _map_l1(params, graph)
            channels = _same_counts(graph, channels, lambda i, maps, n: jnp.argsort(
                jnp.asarray(l1[list(maps)]), stable=True))
        if mode == "paper" and (hand or any(n.startswith("tgd/") for n in graph.leaves)):
            gates = masks_lib.gate_variables(topology if hand else graph, channels, mode)
        elif mode == "paper":  # no gate modules: tgd_jax.autogate applies these values
            auto_gates = True
            gates = unflatten_paths({path: jnp.asarray(v) for path, v in
                                     masks_lib.layer_gate_values(graph, channels).items()})
        settings.update(phi=phi, alpha=alpha, k=k, first=first, last=last, mode=mode)
        if not hand:
            settings.update(combine=combine)
    elif method == "last_k":
        if not 1 <= last_k <= len(graph.layers):
            raise UsageError(f"last_k={last_k} must be in [1, {len(graph.layers)}] for this "
                             "network")
        trainable = {layer.path for layer in graph.layers[-last_k:]}
        maps = {m for layer in graph.layers if layer.path in trainable for m in layer.out_maps}
        channels = {layer.path: jnp.asarray([m in maps for m in layer.out_maps])
                    for layer in graph.layers}
        settings.update(last_k=last_k)
    elif method == "packnet":
        if not 0.0 < packnet_fraction < 1.0:
            raise UsageError(f"packnet_fraction must be in (0, 1), got {packnet_fraction}")
        channels = {layer.path: jnp.zeros((layer.c_out,), bool) for layer in graph.layers}
        settings.update(packnet_fraction=packnet_fraction)
    else:  # full
        channels = {layer.path: jnp.ones((layer.c_out,), bool) for layer in graph.layers}
    full = method == "full"
    mask = masks_lib.expand_channel_masks(params, graph, channels,
                                          other="train" if full else other,
                                          readers="none" if method == "packnet" else readers)
    if method == "packnet":
        mask = _packnet_mask(params, graph, packnet_fraction)
    if readers != "none":
        settings.update(readers=readers)
    summary = masks_lib.mask_summary(params, mask, graph, scores=used_scores or None,
                                     phi=settings.get("phi"))
    if gates:  # paper mode: the gates cut the gradient of some retrained maps
        reached = masks_lib.reached_count(params, mask, graph,
                                          masks_lib.gradient_reach(graph, channels))
        summary["paper_reach"] = {"params_retrained": summary["params_retrained"],
                                  "params_reached": reached}
    summary.update(settings, frozen_bn=frozen_bn, retrained_bn=retrained_bn)
    if not full and "other" in summary:
        summary["other"]["policy"] = other
    running = masks_lib.running_norms(graph, channels, frozen_bn=frozen_bn,
                                      retrained_bn=retrained_bn)
    flags = (unflatten_paths({norm: jnp.asarray(flag) for norm, flag in running.items()})
             if any(flag.any() for flag in running.values()) else {})
    stats_mask = (None if batch_stats is None else
                  masks_lib.statistics_mask(batch_stats, graph, channels, running))
    _warn_silent_mistakes(method, summary, running, batch_stats, phi)
    return TGDPlan(
        method=method, channels=channels, mask=None if full else mask,
        gates=gates, frozen_bn=flags, stats_mask=stats_mask, scores=used_scores,
        summary=summary, graph=graph, auto_gates=auto_gates)


def _warn_silent_mistakes(method: str, summary: Mapping[str, Any],
                          running: Mapping[str, Any], batch_stats: Any, phi: float) -> None:
    """One :class:`~tgd_jax.errors.TGDWarning` line per plan that is valid but most likely
    not what was meant, pointing at the caller's line (outside this module)."""
    frame, level = sys._getframe(1), 2  # stacklevel 1 is this function, 2 its caller
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    if running and batch_stats is None:
        warnings.warn(
            f"the network has {len(running)} BatchNorm layer(s) but the plan was made "
            "without batch_stats=: its stats_mask is None, so keep_frozen cannot keep the "
            "frozen channels' running statistics; pass batch_stats=variables['batch_stats']",
            TGDWarning, stacklevel=level)
    reach = summary.get("paper_reach")
    if reach and 2 * reach["params_reached"] < reach["params_retrained"]:
        warnings.warn(
            f"mode='paper': only {reach['params_reached']:,} of the "
            f"{reach['params_retrained']:,} retrained parameters can receive a gradient (the "
            "gates stop it at frozen maps, so a retrained map whose readers' outputs are all "
            "frozen stays as it is); mode='projected' trains them all", TGDWarning,
            stacklevel=level)
    if method in ("tgd", "random", "l1") and summary.get("params_retrained", 1) == 0:
        warnings.warn(
            f"phi={phi} retrains nothing: no map scores below it (KSE lies in [0, 1]; "
            "maps read by no layer follow last=, those written from the input first=)",
            TGDWarning, stacklevel=level)


def _packnet_mask(params: Any, graph: ChannelGraph, fraction: float) -> Any:
    """Per layer kernel, True on the ``fraction`` of weights with the smallest magnitude
    (ties broken by position); every other leaf frozen (None)."""
    kernels = {layer.kernel for layer in graph.layers}

    def leaf(path: str, value: Any) -> Any:
        if path not in kernels:
            return None
        flat = np.abs(np.asarray(value)).reshape(-1)
        count = int(round(fraction * flat.size))
        chosen = np.zeros(flat.size, bool)
        chosen[np.argsort(flat, kind="stable")[:count]] = True
        return jnp.asarray(chosen.reshape(np.shape(value)))

    return map_with_paths(leaf, params)


def reinitialize(params: Any, batch_stats: Any, plan: TGDPlan, key: jax.Array, *,
                 scale: float = 1.0) -> tuple[Any, Any]:
    """Fresh values for what ``plan`` retrains: ``(params, batch_stats)``.

    The filters of retrained channels are drawn He-normal (``N(0, 2 / fan_in)``, fan_in =
    the filter's size over spatial axes and input channels) times ``scale`` (0: zeros, as
    pruning leaves them); other retrained kernel weights (the input slices of frozen
    filters, the ``readers`` option; PackNet's freed weights) are set to 0, so that the
    kept network's output does not move until training moves them; retrained per-channel
    parameters are reset (a BatchNorm ``scale`` to 1, offsets and biases to 0), and the
    running statistics of retrained channels to mean 0, variance 1 (re-estimate them on
    data before training: ``tgd_jax.train.step.estimate_statistics``). Everything frozen
    is returned unchanged (the same arrays). Whole leaves other than kernels
    (``other="train"``) are left as they are.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> params = {"a": {"kernel": jnp.zeros((3, 3, 1, 4)), "bias": jnp.ones(4)},
      ...           "b": {"kernel": jnp.ones((3, 3, 4, 1))}}
      >>> plan = plan_finetune("last_k", params, sequential_topology(["a", "b"]), last_k=1)
      >>> new, _ = reinitialize(params, {}, plan, jax.random.key(0), scale=0.1)
      >>> bool(jnp.all(new["a"]["kernel"] == 0)), bool(jnp.any(new["b"]["kernel"] != 1))
      (True, True)
    """
    if plan.mask is None:
        raise UsageError("a 'full' plan retrains everything: re-initialising it would be "
                         "training from scratch")
    graph = plan.graph
    kernels = {layer.kernel: layer for layer in graph.layers}
    masks = flat_paths(plan.mask, none_leaves=True)
    keys = iter(jax.random.split(key, max(1, len(masks))))

    def new_param(path: str, value: Any) -> Any:
        mask = masks.get(path)
        k = next(keys)
        if mask is None or not np.any(mask):
            return value
        if path in kernels:
            layer = kernels[path]
            fan_in = int(np.prod(np.shape(value))) // layer.c_out
            own = np.zeros(np.shape(value), bool)  # the filters of retrained channels
            shape = [1] * np.ndim(value)
            shape[layer.out_axis] = layer.c_out
            own |= np.asarray(plan.channels[layer.path], bool).reshape(shape)
            fresh = jnp.where(own, jax.random.normal(k, np.shape(value), jnp.float32) * (
                scale * np.sqrt(2.0 / fan_in)), 0.0)
        elif np.ndim(mask) == 0:
            return value
        else:
            fresh = jnp.ones_like(value) if path.rsplit("/", 1)[-1] == "scale" else (
                jnp.zeros_like(value))
        return jnp.where(mask, fresh.astype(jnp.asarray(value).dtype), value)

    decision = masks_lib.map_decisions(graph, plan.channels)

    def new_stat(path: str, value: Any) -> Any:
        attached = graph.leaves.get(f"batch_stats/{path}")
        if attached is None:
            return value
        axis, maps = attached
        retrained = np.array([m >= 0 and bool(decision[m]) for m in maps])
        if not retrained.any():
            return value
        shape = [1] * np.ndim(value)
        shape[axis] = len(maps)
        fresh = jnp.ones_like(value) if path.rsplit("/", 1)[-1] == "var" else (
            jnp.zeros_like(value))
        return jnp.where(jnp.asarray(retrained).reshape(shape), fresh, value)

    return map_with_paths(new_param, params), map_with_paths(new_stat, batch_stats or {})


def check_variables(graph: ChannelGraph, params: Any, batch_stats: Any = None) -> None:
    """Every variable the graph names must exist with the channel count it expects.

    Raises:
      UsageError: naming the first kernel, per-channel parameter or statistic that is
        missing or has another size (a graph traced from another network, a misspelled
        gate).

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.graph import from_topology
      >>> from tgd_jax.topology import sequential_topology
      >>> params = {"a": {"kernel": jnp.zeros((1, 1, 1, 2)), "bias": jnp.zeros(2)}}
      >>> graph = from_topology(sequential_topology(["a"]), params)
      >>> check_variables(graph, {"a": {"kernel": jnp.zeros((1, 1, 1, 2))}})
      Traceback (most recent call last):
      ...
      tgd_jax.errors.UsageError: the graph names 'params/a/bias', which the variables do not have
    """
    trees = {PARAMS: flat_paths(params)}
    if batch_stats is not None:
        trees["batch_stats"] = flat_paths(batch_stats)
    for layer in graph.layers:
        kernel = trees[PARAMS].get(layer.kernel)
        if kernel is None:
            raise UsageError(f"the graph's layer '{layer.path}' has kernel '{layer.kernel}', "
                             f"which params do not have")
        shape = np.shape(kernel)
        if (shape[layer.in_axis] * layer.groups, shape[layer.out_axis]) != (layer.c_in,
                                                                            layer.c_out):
            raise UsageError(f"'{layer.kernel}' has shape {shape}, but the graph expects "
                             f"{layer.c_in} -> {layer.c_out} channels"
                             + (f" in {layer.groups} groups" if layer.groups > 1 else ""))
    for name, (axis, maps) in graph.leaves.items():
        collection, _, path = name.partition("/")
        if collection not in trees:
            continue
        if path not in trees[collection]:
            raise UsageError(f"the graph names '{name}', which the variables do not have")
        shape = np.shape(trees[collection][path])
        if len(shape) <= axis or shape[axis] != len(maps):
            raise UsageError(f"'{name}' has shape {shape}, but the graph expects {len(maps)} "
                             f"channels on axis {axis}")


def _same_counts(graph: ChannelGraph, channels: Mapping[str, Any], order_fn: Any
                 ) -> dict[str, Any]:
    """Per class of maps (those written by the same layers: per layer in a sequential net),
    the first ``count`` maps of ``order_fn``'s ordering are retrained, ``count`` being how
    many the rule retrained there."""
    decision = masks_lib.map_decisions(graph, channels)
    producers = graph.producers()
    classes: dict[tuple[str, ...], list[int]] = {}
    for layer in graph.layers:
        for m in layer.out_maps:
            if producers[m][0] == layer.path and m not in classes.get(producers[m], []):
                classes.setdefault(producers[m], []).append(m)
    new = decision.copy()
    for i, maps in enumerate(classes.values()):
        count, n = int(decision[maps].sum()), len(maps)
        if count in (0, n):  # frozen or fully trained classes (first/last policies) stay
            continue
        chosen = np.asarray(order_fn(i, maps, n))[:count]
        new[maps] = False
        new[np.asarray(maps)[chosen]] = True
    return {layer.path: jnp.asarray(new[list(layer.out_maps)]) for layer in graph.layers}


def _map_l1(params: Any, graph: ChannelGraph) -> np.ndarray:
    """Per map, the L1 norm of the filters writing it (summed over a residual group)."""
    flat = flat_paths(params)
    out = jnp.zeros(graph.num_maps, jnp.float32)
    for layer in graph.layers:
        kernel = jnp.moveaxis(jnp.abs(jnp.asarray(flat[layer.kernel])), layer.out_axis, -1)
        out = out.at[jnp.asarray(layer.out_maps)].add(
            jnp.sum(kernel.reshape(-1, layer.c_out), axis=0))
    return np.asarray(out)
