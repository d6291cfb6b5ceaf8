"""A published Flax model no one here wrote, unpatched, traced and trained as its users
would: scico 0.0.7's UNet (upsampling by ``jnp.tile``, circular padding, BatchNorm with
momentum 0.99, bias-free convs). ``make test`` installs scico from its wheel without its
dependencies: it pins jax <= 0.8.1, which ours is past, and its models need only flax."""

from __future__ import annotations

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from channel_truth import OUTPUT, agree, linen_truth
from test_any_convnet import check_frozen_and_moved
from test_trace import exact_readers_agree

import tgd_jax
from tgd_jax.errors import TGDWarning

# scico's import adds logging.Filter("No GPU/TPU found, ...") to jax's backend logger, a
# filter by logger NAME that drops every record of it; the worker's later tests read that
# logger, so its filters are put back as they were.
_BACKEND_LOGGER = logging.getLogger("jax._src.xla_bridge")
_filters = list(_BACKEND_LOGGER.filters)
try:
    with warnings.catch_warnings():  # scico's numpy wrappers warn about names jax dropped
        warnings.simplefilter("ignore", UserWarning)
        scico_flax = pytest.importorskip(
            "scico.flax", reason="make test installs scico 0.0.7 (pip install --no-deps)")
finally:
    _BACKEND_LOGGER.filters[:] = _filters


def _unet():
    model = scico_flax.UNet(depth=2, channels=1, num_filters=4)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    # statistics away from (0, 1), so that a perturbed BatchNorm input moves what it should
    variables = {**variables, "batch_stats": jax.tree.map(
        lambda s: s + 0.5, variables["batch_stats"])}
    return model, variables, x


def test_scico_unet_graph_equals_the_measured_wiring():
    model, variables, x = _unet()
    graph = tgd_jax.trace_topology(model.apply, variables, x, train=False)
    assert len(graph.layers) >= 8 and graph.layer  # the convs of every block
    bn_leaves = [(name, 1) for name in graph.leaves if "BatchNorm" in name]
    reads, outputs, leaf_reads = linen_truth(model, variables, x, bn_leaves)
    agree(graph, reads, outputs)
    exact_readers_agree(graph, reads)
    maps = graph.reads()
    assert leaf_reads
    for (name, i), (moved, _) in leaf_reads.items():
        m = graph.leaves[name][1][i]
        readers = {p for p in moved if p[0] != OUTPUT}
        assert readers <= set(maps.get(m, ())), name


@pytest.mark.parametrize("mode", ["projected", "paper"])
def test_scico_unet_own_loop_keeps_frozen_params_and_statistics(mode):
    # The loop of docs/own_model.md, on the model as scico ships it.
    model, variables, x = _unet()
    params, stats = variables["params"], variables["batch_stats"]
    graph = tgd_jax.trace_topology(model.apply, variables, x, train=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TGDWarning)  # paper mode: the reach warning
        plan = tgd_jax.tgd_plan(params, graph, phi=0.5, mode=mode, batch_stats=stats)
    tx = plan.optimizer(optax.adam(1e-2))
    apply = tgd_jax.training_apply(model.apply, plan)
    y = jax.random.normal(jax.random.key(2), x.shape)

    @jax.jit
    def step(params, stats, opt_state):
        def loss(p):
            out, new = apply({"params": p, "batch_stats": stats}, x, train=True,
                             mutable=["batch_stats"])
            return jnp.mean((out - y) ** 2), new["batch_stats"]
        (value, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        new_stats = tgd_jax.keep_frozen(stats, new_stats, plan.stats_mask)
        return optax.apply_updates(params, updates), new_stats, opt_state, value

    new_params, new_stats, opt_state = params, stats, tx.init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TGDWarning)  # the gates are in the pass: no warning
        for _ in range(3):
            new_params, new_stats, opt_state, value = step(new_params, new_stats, opt_state)
    assert np.isfinite(float(value))
    frozen = sum(not np.all(np.asarray(c)) for c in jax.tree.leaves(plan.channels))
    assert frozen > 0 and plan.summary["params_retrained"] > 0
    moved = check_frozen_and_moved(plan.mask, params, new_params)
    reached = plan.summary.get("paper_reach", {}).get("params_reached",
                                                      plan.summary["params_retrained"])
    assert moved > 0 if reached else moved == 0
    check_frozen_and_moved(plan.stats_mask, stats, new_stats)
