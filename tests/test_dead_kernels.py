"""Where TGD cannot learn, and the options that give it a path: the structural fact (a map
read only with zero weight by frozen filters, with the last layer frozen, cannot change the
output), the readers option, re-initialisation and the PackNet baseline."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_any_convnet import OPTIMIZER, check_frozen_and_moved

import tgd_jax
from tgd_jax import methods
from tgd_jax.pet.models import DnCNN
from tgd_jax.train import step as step_lib


def _dead_network(seed=0):
    """A DnCNN whose low-KSE maps are dead: every frozen filter reads the retrained maps
    with exactly zero weight (what long coupled-L2 training converges to)."""
    model = DnCNN(features=(8, 8, 8, 3))
    x = jax.random.normal(jax.random.key(seed + 1), (4, 8, 8, 3))
    variables = model.init(jax.random.key(seed), x[:1])
    params = jax.tree.map(np.array, variables["params"])
    for conv, zero in (("conv2", [0, 3]), ("conv3", [1, 5]), ("conv4", [2, 6])):
        params[conv]["kernel"][..., zero, :] = 0.0  # nobody reads these maps of the layer below
    graph = tgd_jax.trace_topology(model.apply, {**variables, "params": params}, x,
                                   train=False)
    plan = tgd_jax.tgd_plan(params, graph, 0.05, batch_stats=variables["batch_stats"])
    for conv, dead in (("conv1", [0, 3]), ("conv2", [1, 5]), ("conv3", [2, 6])):
        assert set(np.flatnonzero(plan.channels[conv])) == set(dead), conv
    return model, {**variables, "params": params}, x, plan


def test_a_map_only_frozen_filters_read_with_zero_weight_cannot_change_the_output():
    model, variables, x, plan = _dead_network()
    before = model.apply(variables, x)
    rng = np.random.default_rng(0)
    scrambled = jax.tree.map(
        lambda p, m: p if m is None else np.where(np.broadcast_to(m, p.shape),
                                                  rng.normal(size=p.shape) * 10, p),
        variables["params"], plan.mask, is_leaf=lambda v: v is None)
    after = model.apply({**variables, "params": scrambled}, x)
    assert np.asarray(before).tobytes() == np.asarray(after).tobytes()  # whatever the values
    grads = jax.grad(lambda p: jnp.sum(model.apply({**variables, "params": p}, x) ** 2))(
        variables["params"])
    retrained = [np.asarray(g)[np.broadcast_to(m, g.shape)] for g, m in zip(
        jax.tree.leaves(grads), jax.tree.leaves(plan.mask, is_leaf=lambda v: v is None),
        strict=True) if m is not None]
    assert all(np.all(r == 0) for r in retrained) and sum(r.size for r in retrained) > 0


def test_retraining_the_readers_opens_the_path():
    model, variables, x, _ = _dead_network()
    graph = tgd_jax.trace_topology(model.apply, variables, x, train=False)
    plan = tgd_jax.tgd_plan(variables["params"], graph, 0.05, readers="all",
                            batch_stats=variables["batch_stats"])
    mask = plan.mask["conv2"]["kernel"]  # conv2 reads conv1's retrained maps 0 and 3
    assert mask.shape == (1, 1, 8, 8)
    assert np.all(mask[0, 0, [0, 3], :]) and not np.any(mask[0, 0, [1, 2], :][:, [0, 2]])
    grads = jax.grad(lambda p: jnp.sum(model.apply({**variables, "params": p}, x) ** 2))(
        variables["params"])
    assert np.any(np.asarray(grads["conv2"]["kernel"])[..., [0, 3], :] != 0)
    with pytest.raises(ValueError, match="readers='all' needs mode='projected'"):
        tgd_jax.tgd_plan(variables["params"], graph, 0.05, readers="all", mode="paper")
    last = tgd_jax.tgd_plan(variables["params"], graph, 0.05, readers="last")
    assert not np.any(last.mask["conv2"]["kernel"][0, 0, [0, 3]][:, [0, 2]])
    assert np.all(last.mask["conv4"]["kernel"][0, 0, [2, 6], :])


@pytest.mark.parametrize("option", ["readers", "readers-last", "reinit", "packnet"])
def test_each_option_keeps_what_it_freezes_bit_identical(option):
    model, variables, x, _ = _dead_network(seed=3)
    graph = tgd_jax.trace_topology(model.apply, variables, x, train=False)
    stats = variables["batch_stats"]
    method = "packnet" if option == "packnet" else "tgd"
    plan = methods.plan_finetune(method, variables["params"], graph, phi=0.05,
                                 readers={"readers": "all", "readers-last": "last"}.get(
                                     option, "none"),
                                 packnet_fraction=0.3, batch_stats=stats)
    params = variables["params"]
    if not option.startswith("readers"):
        params, stats = methods.reinitialize(params, stats, plan, jax.random.key(5), scale=0.5)
        # re-initialisation itself changes nothing frozen
        check_frozen_and_moved(plan.mask, variables["params"], params)
        check_frozen_and_moved(plan.stats_mask, variables["batch_stats"], stats)
    if option == "packnet":
        kernel = np.asarray(variables["params"]["conv2"]["kernel"])
        freed = np.asarray(plan.mask["conv2"]["kernel"])
        assert freed.mean() == pytest.approx(0.3, abs=0.01)
        assert np.abs(kernel[freed]).max() <= np.abs(kernel[~freed]).min()  # the smallest
        assert plan.mask["conv2"].get("bias") is None and plan.mask["bn2"]["scale"] is None
    tx = plan.optimizer(**OPTIMIZER)
    state = step_lib.create_train_state({"params": params, "batch_stats": stats}, tx, plan)
    fn = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx))
    for _ in range(3):
        state, _ = fn(state, {"inputs": x, "targets": 0.5 * x})
    assert check_frozen_and_moved(plan.mask, params, state.params) > 0
    check_frozen_and_moved(plan.stats_mask, stats, state.batch_stats)


def test_reinitialise_draws_he_normal_at_the_scale_and_resets_batchnorm():
    model = DnCNN(features=(16, 64, 64, 3))
    x = jnp.zeros((1, 8, 8, 3))
    variables = model.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + 0.5, variables["params"])
    stats = jax.tree.map(lambda s: s + 0.5, variables["batch_stats"])
    graph = tgd_jax.trace_topology(model.apply, {"params": params, "batch_stats": stats}, x,
                                   train=False)
    plan = methods.plan_finetune("last_k", params, graph, last_k=3, batch_stats=stats)
    new, new_stats = methods.reinitialize(params, stats, plan, jax.random.key(1), scale=0.5)
    kernel = np.asarray(new["conv3"]["kernel"])  # fan_in = 9 * 64
    assert np.std(kernel) == pytest.approx(0.5 * np.sqrt(2 / (9 * 64)), rel=0.05)
    assert abs(np.mean(kernel)) < 0.01
    np.testing.assert_array_equal(new["bn3"]["scale"], 1.0)
    np.testing.assert_array_equal(new["bn3"]["bias"], 0.0)
    np.testing.assert_array_equal(new_stats["bn3"]["mean"], 0.0)
    np.testing.assert_array_equal(new_stats["bn3"]["var"], 1.0)
    assert np.asarray(new["conv1"]["kernel"]).tobytes() == np.asarray(
        params["conv1"]["kernel"]).tobytes()
    with pytest.raises(ValueError, match="training from scratch"):
        methods.reinitialize(params, stats, methods.plan_finetune("full", params, graph),
                             jax.random.key(1))


def test_statistics_are_re_estimated_for_re_drawn_channels_only():
    model, variables, x, plan = _dead_network(seed=4)
    params, stats = methods.reinitialize(variables["params"], variables["batch_stats"], plan,
                                         jax.random.key(2))
    batches = [x, 1.5 * x + 0.3]
    new = step_lib.estimate_statistics(model, {"params": params, "batch_stats": stats},
                                       batches, plan.stats_mask)
    # independent truth: the conv outputs feeding each BatchNorm, captured on the same data
    moments = {}
    for batch in batches:
        _, captured = model.apply({"params": params, "batch_stats": stats}, batch, train=True,
                                  capture_intermediates=lambda m, _: str(m.name).startswith(
                                      "conv"),
                                  mutable=["batch_stats", "intermediates"])
        for name, value in captured["intermediates"].items():
            h = np.asarray(value["__call__"][0], np.float64)
            moments.setdefault(name, []).append((h.mean((0, 1, 2)), h.var((0, 1, 2))))
    for bn in ("bn2", "bn3"):
        conv = bn.replace("bn", "conv")
        retrained = np.asarray(plan.channels[conv])
        mean = np.mean([m for m, _ in moments[conv]], axis=0)
        var = np.mean([v for _, v in moments[conv]], axis=0)
        np.testing.assert_allclose(np.asarray(new[bn]["mean"])[retrained], mean[retrained],
                                   rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(np.asarray(new[bn]["var"])[retrained], var[retrained],
                                   rtol=1e-3, atol=1e-4)
        for stat in ("mean", "var"):  # frozen channels: exactly as they were
            assert np.asarray(new[bn][stat])[~retrained].tobytes() == np.asarray(
                variables["batch_stats"][bn][stat])[~retrained].tobytes()
