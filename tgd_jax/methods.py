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
from collections.abc import Callable, Mapping
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
from tgd_jax.rule import TGDRule
from tgd_jax.topology import Topology

__all__ = ["METHODS", "FROZEN_BN", "TGDPlan", "TGDRule", "Selection", "Selector", "SELECTORS",
           "register_selector", "tgd_plan", "plan_finetune", "check_variables", "reinitialize"]

#: The built-in fine-tuning methods (:data:`SELECTORS` holds them and any registered).
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


def tgd_plan(params: Any, topology: Topology | ChannelGraph, phi: float | None = None, *,
             rule: TGDRule | None = None, batch_stats: Any = None,
             scores: Mapping[str, Any] | None = None, **options: Any) -> TGDPlan:
    """The TGD rule in one call: KSE scores, channel masks, params mask, gates.

    ``plan_finetune("tgd", ...)``: ``rule`` (a :class:`~tgd_jax.rule.TGDRule`), or its
    fields as keywords (``phi`` may come positionally).

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
    if phi is not None:
        if rule is not None:
            raise UsageError("pass phi inside rule=, not beside it")
        options["phi"] = phi
    return plan_finetune("tgd", params, topology, rule=rule, batch_stats=batch_stats,
                         scores=scores, **options)


@dataclasses.dataclass(frozen=True)
class Selection:
    """What a selector decides from.

    Attributes:
      params: the pretrained params.
      graph: the network's channel graph.
      rule: the plan's :class:`~tgd_jax.rule.TGDRule`.
      choice: for a selector with ``uses_kse``, TGD's own decision (layer path ->
        ``(C_out,)`` bool, KSE below ``rule.phi`` with the first/last policies), which
        ``random`` and ``l1`` redistribute at the same counts; else ``{}``.
      key: the PRNG key given to the plan (None if none was).
      last_k: the ``last_k`` selector's layer count.

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> seen = []
      >>> def spy(sel):  # TGD's own choice, recorded, then kept
      ...     seen.append({path: m.tolist() for path, m in sel.choice.items()})
      ...     return dict(sel.choice)
      >>> register_selector("spy", Selector(spy, uses_kse=True))
      >>> params = {"a": {"kernel": jnp.ones((3, 3, 1, 2))},
      ...           "b": {"kernel": jnp.ones((3, 3, 2, 1))}}
      >>> _ = plan_finetune("spy", params, sequential_topology(["a", "b"]), phi=0.5,
      ...                   last="train")
      >>> seen  # identical kernels: KSE cannot tell a's maps apart, both score 1 (kept)
      [{'a': [False, False], 'b': [True]}]
      >>> del SELECTORS["spy"]
    """

    params: Any
    graph: ChannelGraph
    rule: TGDRule
    choice: Mapping[str, Any]
    key: jax.Array | None
    last_k: int


@dataclasses.dataclass(frozen=True)
class Selector:
    """A way of choosing what a plan retrains, registered by name in :data:`SELECTORS`.

    Attributes:
      channels: ``Selection -> {layer path: (C_out,) bool}``, True = retrained; maps tied
        together must get one value (every built-in selector decides per map).
      uses_kse: the selector redistributes TGD's KSE decision (it is computed first and
        passed as ``Selection.choice``); the rule's threshold fields, ``readers`` and
        paper mode's gates then apply to it.
      weights: optional ``Selection -> params mask`` that replaces the mask expanded
        from the channels (PackNet frees single weights, not channels).
      restricts: False for plain fine-tuning: the plan has no mask.
      settings: the rule fields (or ``"last_k"``) the summary records for this selector.

    Example:
      >>> SELECTORS["random"].uses_kse, SELECTORS["full"].restricts
      (True, False)
    """

    channels: Callable[[Selection], dict[str, Any]]
    uses_kse: bool = False
    weights: Callable[[Selection], Any] | None = None
    restricts: bool = True
    settings: tuple[str, ...] = ()


def _select_tgd(sel: Selection) -> dict[str, Any]:
    return dict(sel.choice)


def _select_random(sel: Selection) -> dict[str, Any]:
    if sel.key is None:
        raise UsageError("method 'random' needs a PRNG key")
    key = sel.key
    return _same_counts(sel.graph, sel.choice, lambda i, maps, n: jax.random.permutation(
        jax.random.fold_in(key, i), n))


def _select_l1(sel: Selection) -> dict[str, Any]:
    l1 = _map_l1(sel.params, sel.graph)
    return _same_counts(sel.graph, sel.choice, lambda i, maps, n: jnp.argsort(
        jnp.asarray(l1[list(maps)]), stable=True))


def _select_last_k(sel: Selection) -> dict[str, Any]:
    graph = sel.graph
    if not 1 <= sel.last_k <= len(graph.layers):
        raise UsageError(f"last_k={sel.last_k} must be in [1, {len(graph.layers)}] for this "
                         "network")
    trainable = {layer.path for layer in graph.layers[-sel.last_k:]}
    maps = {m for layer in graph.layers if layer.path in trainable for m in layer.out_maps}
    return {layer.path: jnp.asarray([m in maps for m in layer.out_maps])
            for layer in graph.layers}


def _constant(value: bool) -> Callable[[Selection], dict[str, Any]]:
    def select(sel: Selection) -> dict[str, Any]:
        return {layer.path: jnp.full((layer.c_out,), value) for layer in sel.graph.layers}
    return select


_KSE_SETTINGS = ("phi", "alpha", "k", "first", "last", "mode")

#: name -> :class:`Selector`: the fine-tuning methods :func:`plan_finetune` makes plans
#: for. ``register_selector`` adds one.
SELECTORS: dict[str, Selector] = {
    "tgd": Selector(_select_tgd, uses_kse=True, settings=_KSE_SETTINGS),
    "last_k": Selector(_select_last_k, settings=("last_k",)),
    "full": Selector(_constant(True), restricts=False),
    "random": Selector(_select_random, uses_kse=True, settings=_KSE_SETTINGS),
    "l1": Selector(_select_l1, uses_kse=True, settings=_KSE_SETTINGS),
    "packnet": Selector(_constant(False), weights=lambda sel: _packnet_mask(
        sel.params, sel.graph, sel.rule.packnet_fraction), settings=("packnet_fraction",)),
}


def register_selector(name: str, selector: Selector, *, replace: bool = False) -> None:
    """Makes ``plan_finetune(name, ...)`` (and the commands' ``--config.method=name``)
    choose with ``selector``. Replacing a built-in needs ``replace=True``.

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> def first_half(sel):  # the first half of every layer's channels
      ...     return {la.path: jnp.arange(la.c_out) < la.c_out // 2 for la in sel.graph.layers}
      >>> register_selector("first_half", Selector(first_half))
      >>> params = {"a": {"kernel": jnp.ones((3, 3, 1, 4))},
      ...           "b": {"kernel": jnp.ones((3, 3, 4, 2))}}
      >>> plan = plan_finetune("first_half", params, sequential_topology(["a", "b"]))
      >>> plan.channels["a"].tolist()
      [True, True, False, False]
      >>> del SELECTORS["first_half"]
    """
    if not isinstance(selector, Selector):
        raise UsageError(f"selector {name!r} must be a tgd_jax.methods.Selector, got "
                         f"{type(selector).__name__}")
    if name in SELECTORS and not replace:
        raise UsageError(f"a selector named {name!r} exists; pass replace=True to replace it")
    SELECTORS[name] = selector


def plan_finetune(method: str, params: Any, topology: Topology | ChannelGraph, *,
                  rule: TGDRule | None = None, batch_stats: Any = None, last_k: int = 3,
                  key: jax.Array | None = None, scores: Mapping[str, Any] | None = None,
                  **options: Any) -> TGDPlan:
    """The :class:`TGDPlan` of ``method`` for a network's ``params``.

    Args:
      method: a name in :data:`SELECTORS` (built in: :data:`METHODS`).
      params: the pretrained ``params`` (the pytree the optimizer trains: a Linen params
        dict, or an NNX ``State`` of ``nnx.Param``; the masks mirror its type).
      topology: the network's :class:`~tgd_jax.graph.ChannelGraph`
        (:func:`tgd_jax.trace_topology`), or a hand-written topology (converted here).
      rule: the :class:`~tgd_jax.rule.TGDRule` (threshold, KSE parameters, first/last
        policies, mode, BatchNorm modes, ...); or leave it out and pass its fields as
        keywords (``phi=0.4, mode="paper"``), validated the same way.
      batch_stats: the ``batch_stats`` (needed to train a network that has them: the plan
        then says which statistics may change, ``stats_mask``). Without them a graph's
        BatchNorms still get their modes (``frozen_bn``; a hand topology's ``norm`` is
        taken as a Flax BatchNorm, statistics ``mean`` and ``var``), with a warning.
      last_k: layers fine-tuned by ``last_k`` (the last in forward order).
      key: PRNG key for ``random`` (required there).
      scores: precomputed :func:`tgd_jax.masks.layer_scores` of ``params`` (same alpha,
        k and combine), to try several thresholds without recomputing KSE.

    Raises:
      UsageError: an unknown method or rule field, a bad value (named by
        :class:`~tgd_jax.rule.TGDRule`), a topology that does not match the params;
        ``mode="paper"`` with a hand topology that names no gates (it would silently
        train in projected mode).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 1, 8))},
      ...           "b": {"kernel": jax.random.normal(jax.random.key(1), (3, 3, 8, 1))}}
      >>> topology = sequential_topology(["a", "b"])
      >>> tgd = plan_finetune("tgd", params, topology, phi=0.5)
      >>> rnd = plan_finetune("random", params, topology, rule=TGDRule(phi=0.5),
      ...                     key=jax.random.key(2))
      >>> int(tgd.channels["a"].sum()) == int(rnd.channels["a"].sum())  # same count, other maps
      True
    """
    selector = SELECTORS.get(method)
    if selector is None:
        raise UsageError(f"unknown fine-tuning method {method!r}; choose one of "
                         f"{tuple(SELECTORS)}")
    if rule is None:
        rule = TGDRule.from_options(options)
    elif options:
        raise UsageError(f"pass either rule= or its fields {sorted(options)}, not both")
    elif not isinstance(rule, TGDRule):
        raise UsageError(f"rule must be a tgd_jax.TGDRule, got {type(rule).__name__}")
    hand = not isinstance(topology, ChannelGraph)
    graph = as_graph(topology, params, batch_stats)
    check_variables(graph, params, batch_stats)
    gate_leaves = any(name.startswith("tgd/") for name in graph.leaves)  # TGDGate modules
    mode = rule.mode if selector.uses_kse else "projected"
    readers = rule.readers if selector.weights is None else "none"
    used_scores: dict[str, Any] = {}
    choice: dict[str, Any] = {}
    if selector.uses_kse:
        if mode == "paper" and hand and not gate_leaves:
            raise UsageError("mode='paper' gates the backward pass, but the topology names no "
                             "TGD gates: build the model with TGDGate modules and list them "
                             "in ConvNode.gates, trace it, or use mode='projected'")
        used_scores = dict(scores if scores is not None else masks_lib.layer_scores(
            params, graph, alpha=rule.alpha, k=rule.k, combine=rule.combine))
        choice = masks_lib.channel_masks_from_scores(params, graph, used_scores, rule.phi,
                                                     first=rule.first, last=rule.last)
    selection = Selection(params=params, graph=graph, rule=rule, choice=choice, key=key,
                          last_k=last_k)
    channels = selector.channels(selection)
    settings: dict[str, Any] = {"method": method}
    settings.update({f: (last_k if f == "last_k" else getattr(rule, f))
                     for f in selector.settings})
    if selector.uses_kse and not hand:
        settings.update(combine=rule.combine)
    gates: dict[str, Any] = {}
    auto_gates = False
    if selector.uses_kse and mode == "paper":
        if gate_leaves:
            gates = masks_lib.gate_variables(graph, channels, mode)
        else:  # no gate modules: tgd_jax.autogate applies these values
            auto_gates = True
            gates = unflatten_paths({path: jnp.asarray(v) for path, v in
                                     masks_lib.layer_gate_values(graph, channels).items()})
    other = rule.other if selector.restricts else "train"
    mask = (selector.weights(selection) if selector.weights is not None else
            masks_lib.expand_channel_masks(params, graph, channels, other=other,
                                           readers=readers))
    if readers != "none":
        settings.update(readers=readers)
    summary = masks_lib.mask_summary(params, mask, graph, scores=used_scores or None,
                                     phi=settings.get("phi"))
    if gates:  # paper mode: the gates cut the gradient of some retrained maps
        reached = masks_lib.reached_count(params, mask, graph,
                                          masks_lib.gradient_reach(graph, channels))
        summary["paper_reach"] = {"params_retrained": summary["params_retrained"],
                                  "params_reached": reached}
    summary.update(settings, frozen_bn=rule.frozen_bn, retrained_bn=rule.retrained_bn)
    if selector.restricts and "other" in summary:
        summary["other"]["policy"] = rule.other
    running = masks_lib.running_norms(graph, channels, frozen_bn=rule.frozen_bn,
                                      retrained_bn=rule.retrained_bn)
    flags = (unflatten_paths({norm: jnp.asarray(flag) for norm, flag in running.items()})
             if any(flag.any() for flag in running.values()) else {})
    stats_mask = (None if batch_stats is None else
                  masks_lib.statistics_mask(batch_stats, graph, channels, running))
    _warn_silent_mistakes(selector, summary, running, batch_stats, rule.phi)
    return TGDPlan(
        method=method, channels=channels, mask=mask if selector.restricts else None,
        gates=gates, frozen_bn=flags, stats_mask=stats_mask, scores=used_scores,
        summary=summary, graph=graph, auto_gates=auto_gates)


def _warn_silent_mistakes(selector: Selector, summary: Mapping[str, Any],
                          running: Mapping[str, Any], batch_stats: Any, phi: float) -> None:
    """One :class:`~tgd_jax.errors.TGDWarning` line per plan that is valid but most likely
    not what was meant, pointing at the caller's line (outside this module)."""
    frame, level = sys._getframe(1), 2  # stacklevel 1 is this function, 2 its caller
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    if running and batch_stats is None:
        warnings.warn(
            f"the network has {len(running)} BatchNorm layer(s) but the plan was made "
            "without batch_stats=: its stats_mask is None, and keep_frozen(old, new, None) "
            "keeps every old statistic, so the retrained channels' running statistics never "
            "update; pass batch_stats=variables['batch_stats']",
            TGDWarning, stacklevel=level)
    reach = summary.get("paper_reach")
    if reach and 2 * reach["params_reached"] < reach["params_retrained"]:
        warnings.warn(
            f"mode='paper': only {reach['params_reached']:,} of the "
            f"{reach['params_retrained']:,} retrained parameters can receive a gradient (the "
            "gates stop it at frozen maps, so a retrained map whose readers' outputs are all "
            "frozen stays as it is); mode='projected' trains them all", TGDWarning,
            stacklevel=level)
    if selector.uses_kse and summary.get("params_retrained", 1) == 0:
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
