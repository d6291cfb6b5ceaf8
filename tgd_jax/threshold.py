"""The paper's threshold study: zero the kernels TGD would retrain, and measure what changes.

TGD's premise is that kernels with a low KSE are useless: the network's output should not
depend on them. The paper tests it by setting them to zero at inference for several
thresholds phi and looking at the output (its figure: 51.4 / 51.6 / 53.0 / 67.3 % of the
parameters dropped at phi = 0.3 / 0.4 / 0.5 / 0.6, "artifacts above 0.4").

:func:`threshold_study` does this for any network and turns the look into numbers: for each
phi, the fraction of parameters TGD would retrain (and here drops), and the loss and output
change with those kernels zeroed, against the SAME per-layer counts chosen at random and by
lowest filter L1 norm. If KSE finds useless kernels, its curve stays at the intact loss
while random choices of the same size do not.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from tgd_jax import masks as masks_lib
from tgd_jax import methods as methods_lib
from tgd_jax.errors import TGDWarning, UsageError
from tgd_jax.graph import ChannelGraph, as_graph, flat_paths, kernel_by_input
from tgd_jax.topology import Topology

__all__ = ["PAPER_FRACTIONS", "DEFAULT_PHIS", "threshold_study", "output_change",
           "consumer_share"]

#: The paper's fractions of parameters dropped at phi = 0.3, 0.4, 0.5, 0.6 (its figure).
PAPER_FRACTIONS: dict[float, float] = {0.3: 0.514, 0.4: 0.516, 0.5: 0.530, 0.6: 0.673}
#: The thresholds of the paper's threshold study.
DEFAULT_PHIS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)

#: ``evaluate(params) -> (loss, outputs)``: a scalar loss on fixed held-out data and the
#: network's outputs there (any array), both computed with the given params.
Evaluate = Callable[[Any], tuple[float, np.ndarray]]


def output_change(outputs: np.ndarray, intact: np.ndarray, inputs: np.ndarray) -> float:
    """``||outputs - intact|| / ||inputs - intact||``: how much zeroing changed the output,
    relative to what the intact network changes in its input (0 = unchanged; 1 = a change
    as large as the whole denoising).

    Example:
      >>> import numpy as np
      >>> intact, inputs = np.zeros(4), np.ones(4)
      >>> output_change(intact, intact, inputs), output_change(inputs, intact, inputs)
      (0.0, 1.0)
    """
    scale = float(np.linalg.norm(np.asarray(inputs) - np.asarray(intact)))
    return float(np.linalg.norm(np.asarray(outputs) - np.asarray(intact))) / max(scale, 1e-30)


def consumer_share(params: Any, topology: Topology | ChannelGraph,
                   channels: dict[str, Any]) -> dict[str, float]:
    """Per layer, the share of its readers' kernel L1 mass that reads its retrained maps.

    This is what paper-mode TGD assumes to be ~0: a "useless" map is one the next layer
    does not read. A random choice of a fraction f of the maps gets a share of about f.
    Returns ``{layer: share}`` for layers with a reader and at least one retrained map.

    Example:
      >>> import jax.numpy as jnp
      >>> from tgd_jax.topology import sequential_topology
      >>> params = {"a": {"kernel": jnp.ones((1, 1, 1, 2))},
      ...           "b": {"kernel": jnp.array([1.0, 3.0]).reshape(1, 1, 2, 1)}}
      >>> consumer_share(params, sequential_topology(["a", "b"]), {"a": jnp.array([True, False])})
      {'a': 0.25}
    """
    graph = as_graph(topology, params)
    decision = masks_lib.map_decisions(graph, {  # a layer not in ``channels``: frozen
        layer.path: channels.get(layer.path, np.zeros(layer.c_out, bool))
        for layer in graph.layers})
    flat = flat_paths(params)
    mass = {}  # reader -> L1 mass per input channel
    for layer in graph.layers:
        kernel = kernel_by_input(np.abs(np.asarray(flat[layer.kernel])), layer)
        mass[layer.path] = kernel.reshape(-1, *kernel.shape[-2:]).sum(axis=(0, 2))
    reads = graph.reads()
    out = {}
    for layer in graph.layers:
        maps = set(layer.out_maps)
        retrained = {m for m in maps if decision[m]}
        if not retrained:
            continue
        positions: dict[str, list[tuple[int, bool]]] = {}  # reader -> (input channel, retrained)
        for m in maps:
            for r, j in reads.get(m, ()):
                positions.setdefault(r, []).append((j, m in retrained))
        if not positions:
            continue
        total = share = 0.0
        for r, read in positions.items():
            read.sort()
            index = np.array([j for j, _ in read])
            chosen = np.array([j for j, retrain in read if retrain], int)
            total += mass[r][index].sum()
            share += mass[r][chosen].sum()
        out[layer.path] = float(share / max(total, 1e-30))
    return out


def threshold_study(
    params: Any,
    topology: Topology,
    evaluate: Evaluate,
    inputs: np.ndarray,
    *,
    phis: Sequence[float] = DEFAULT_PHIS,
    alpha: float = 1.0,
    k: int = 5,
    first: str = "kse",
    key: jax.Array,
    random_draws: int = 3,
    combine: str = "max",
) -> dict[str, Any]:
    """Loss and output change with the kernels below each phi zeroed: KSE vs random vs L1.

    Args:
      params: the network's ``params``.
      topology: its conv wiring.
      evaluate: ``params -> (loss, outputs)`` on fixed held-out data (see :data:`Evaluate`).
      inputs: the inputs ``evaluate`` denoises (same shape as its outputs), to scale the
        output change.
      phis: thresholds.
      alpha, k, first: TGD's KSE and first-layer settings.
      key: PRNG key of the random choices.
      random_draws: random choices per phi (mean and sd reported).
      combine: how a map read by several layers combines their scores
        (:data:`tgd_jax.masks.COMBINE`).

    Returns:
      JSON-ready ``{"intact_loss", "rows": [...]}``, one row per phi: ``phi``,
      ``fraction`` (of all parameters retrained by TGD, and dropped here),
      ``channels`` (per layer), ``consumer_share`` (:func:`consumer_share` of TGD's
      choice), and for ``kse``, ``random``, ``l1``: ``loss``,
      ``loss_sd`` (random only), ``output_change``.

    Example:
      >>> import jax, numpy as np
      >>> from tgd_jax.topology import sequential_topology
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> params = {"a": {"kernel": jax.random.normal(k1, (1, 1, 1, 8))},
      ...           "b": {"kernel": jax.random.normal(k2, (1, 1, 8, 1))}}
      >>> x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 4, 4, 1)
      >>> def evaluate(p):  # a linear 1x1 conv pair; loss against the input itself
      ...     y = x @ p["a"]["kernel"][0, 0] @ p["b"]["kernel"][0, 0]
      ...     return float(np.mean((y - x) ** 2)), np.asarray(y)
      >>> study = threshold_study(params, sequential_topology(["a", "b"]), evaluate, x,
      ...                         phis=(0.5,), key=jax.random.key(1))
      >>> sorted(study["rows"][0]["kse"]), 0 < study["rows"][0]["fraction"] < 1
      (['loss', 'output_change'], True)
    """
    if random_draws < 1:
        raise UsageError(f"random_draws must be >= 1, got {random_draws}")
    intact_loss, intact = evaluate(params)
    scores = masks_lib.layer_scores(params, topology, alpha=alpha, k=k, combine=combine)
    rows = []
    for phi in phis:
        row: dict[str, Any] = {"phi": float(phi)}
        for method in ("tgd", "random", "l1"):
            losses, changes = [], []
            for draw in range(random_draws if method == "random" else 1):
                with warnings.catch_warnings():  # zeroing, not training: statistics and
                    warnings.simplefilter("ignore", TGDWarning)  # empty choices are fine
                    plan = methods_lib.plan_finetune(
                        method, params, topology, phi=phi, alpha=alpha, k=k, first=first,
                        mode="projected", key=jax.random.fold_in(key, draw), scores=scores,
                        combine=combine)
                loss, out = evaluate(masks_lib.drop_kernels(params, plan.mask))
                losses.append(float(loss))
                changes.append(output_change(out, intact, inputs))
                if method == "tgd":
                    row["fraction"] = plan.summary["retrained_fraction"]
                    row["channels"] = {e["layer"]: [e["channels_retrained"], e["channels_total"]]
                                       for e in plan.summary["layers"]}
                    row["consumer_share"] = consumer_share(params, topology, plan.channels)
            name = "kse" if method == "tgd" else method
            row[name] = {"loss": float(np.mean(losses)), "output_change": float(np.mean(changes))}
            if method == "random":
                row[name]["loss_sd"] = float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0
        rows.append(row)
    return {"intact_loss": float(intact_loss), "phis": [float(p) for p in phis],
            "random_draws": random_draws, "combine": combine, "rows": rows}
