"""Which weights a fine-tuning method retrains: TGD, the paper's baselines, and two ablations.

* ``tgd``: channels whose KSE (rated in the consumer layer) is below ``phi`` (the paper).
* ``last_k``: the paper's FT-net: the last ``k`` conv blocks (conv + BatchNorm), whole.
* ``full``: every weight (plain fine-tuning; no mask).
* ``random``: per layer, as MANY channels as TGD would retrain, chosen uniformly at random.
* ``l1``: per layer, as many channels as TGD, those whose filter has the lowest L1 norm
  (the filter-pruning criterion of Li et al. 2017: ``sum |W[..., n]|`` over the filter n).

``random`` and ``l1`` differ from ``tgd`` only in the choice of channels (same counts, same
first/last-layer policies, same gates in ``paper`` mode), so they isolate what KSE adds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tgd_jax import masks as masks_lib
from tgd_jax.topology import Topology, get_path

__all__ = ["METHODS", "FinetunePlan", "plan_finetune"]

METHODS = ("tgd", "last_k", "full", "random", "l1")


@dataclasses.dataclass
class FinetunePlan:
    """What a method retrains.

    Attributes:
      method: one of :data:`METHODS`.
      mask: pytree mirroring params (True = retrain), or None for ``full``.
      channels: conv path -> ``(C_out,)`` bool (True = retrain).
      gates: the ``"tgd"`` collection (``{}``: no gated backward pass).
      scores: conv path -> KSE of its output channels (``tgd``/``random``/``l1``), else {}.
      summary: :func:`tgd_jax.masks.mask_summary` plus the method's settings (JSON).
    """

    method: str
    mask: Any
    channels: dict[str, Any]
    gates: dict[str, Any]
    scores: dict[str, Any]
    summary: dict[str, Any]

    @property
    def use_gates(self) -> bool:
        return bool(self.gates)


def plan_finetune(method: str, params: Any, topology: Topology, *, phi: float = 0.3,
                  alpha: float = 1.0, k: int = 5, first: str = "kse", last: str = "frozen",
                  mode: str = "paper",
                  last_k: int = 3, key: jax.Array | None = None,
                  scores: Mapping[str, Any] | None = None) -> FinetunePlan:
    """The mask, gates and summary of ``method`` for a network's ``params``.

    Args:
      method: one of :data:`METHODS`.
      params: the pretrained ``params`` collection.
      topology: its conv wiring (e.g. ``DnCNN(...).topology()``).
      phi, alpha, k, first, last, mode: TGD settings (used by ``tgd``, ``random``, ``l1``).
      last_k: blocks fine-tuned by ``last_k``.
      key: PRNG key for ``random`` (required there).
      scores: precomputed :func:`tgd_jax.masks.layer_scores` of ``params`` (same alpha and
        k), to try several thresholds without recomputing KSE.
    """
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; choose one of {METHODS}")
    settings: dict[str, Any] = {"method": method}
    given_scores, scores = scores, {}
    gates: dict[str, Any] = {}
    if method in ("tgd", "random", "l1"):
        tgd = masks_lib.tgd_masks(params, topology, phi, alpha=alpha, k=k, first=first, last=last,
                                  mode=mode, scores=given_scores)
        channels, scores = dict(tgd.channels), dict(tgd.scores)
        if method == "random":
            if key is None:
                raise ValueError("method 'random' needs a PRNG key")
            channels = _same_counts(channels, lambda i, path, n: jax.random.permutation(
                jax.random.fold_in(key, i), n))
        elif method == "l1":
            channels = _same_counts(channels, lambda i, path, n: jnp.argsort(
                _filter_l1(params, path), stable=True))
        gates = masks_lib.gate_variables(topology, channels, mode)
        settings.update(phi=phi, alpha=alpha, k=k, first=first, last=last, mode=mode)
    elif method == "last_k":
        if not 1 <= last_k <= len(topology):
            raise ValueError(f"last_k={last_k} must be in [1, {len(topology)}] for this network")
        trainable = {node.conv for node in list(topology)[-last_k:]}
        channels = {node.conv: jnp.full((get_path(params, f"{node.conv}/kernel").shape[-1],),
                                        node.conv in trainable) for node in topology}
        settings.update(last_k=last_k)
    else:  # full
        channels = {node.conv: jnp.ones((get_path(params, f"{node.conv}/kernel").shape[-1],),
                                        bool) for node in topology}
    mask = masks_lib.expand_channel_masks(params, topology, channels)
    summary = masks_lib.mask_summary(params, _all_true_where_none(mask, params)
                                     if method == "full" else mask, topology,
                                     scores=scores or None,
                                     phi=settings.get("phi"))
    summary.update(settings)
    return FinetunePlan(method, None if method == "full" else mask, channels, gates, scores,
                        summary)


def _same_counts(channels: Mapping[str, Any], order_fn: Any) -> dict[str, Any]:
    """Per layer, the first ``count`` channels of ``order_fn``'s ordering are retrained."""
    out = {}
    for i, (path, mask) in enumerate(channels.items()):
        mask = np.asarray(mask, bool)
        count, n = int(mask.sum()), mask.shape[0]
        if count in (0, n):  # frozen or fully trained layers (first/last policies) stay
            out[path] = jnp.asarray(mask)
            continue
        chosen = np.asarray(order_fn(i, path, n))[:count]
        new = np.zeros(n, bool)
        new[chosen] = True
        out[path] = jnp.asarray(new)
    return out


def _filter_l1(params: Any, conv: str) -> jax.Array:
    kernel = get_path(params, f"{conv}/kernel")
    return jnp.sum(jnp.abs(kernel.reshape(-1, kernel.shape[-1])), axis=0)


def _all_true_where_none(mask: Any, params: Any) -> Any:
    return jax.tree.map(lambda m, p: jnp.ones(p.shape, bool) if m is None else
                        jnp.ones_like(m), mask, params, is_leaf=lambda x: x is None)
