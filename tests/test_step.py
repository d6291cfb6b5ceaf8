"""The TGD training step: every frozen element, params and BN statistics, stays put."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest
from conftest import frozen_and_retrained

from tgd_jax import optim
from tgd_jax.methods import tgd_plan
from tgd_jax.train import step


@pytest.fixture(scope="module")
def setup(tiny_dncnn):
    model, variables = tiny_dncnn
    result = tgd_plan(variables["params"], model.topology(), 0.5, mode="paper")
    x = 1.0 + jax.random.normal(jax.random.key(11), (4, 8, 8, 3))
    batch = {"inputs": x, "targets": 0.5 * x}
    return model, variables, result, batch


def _train(model, variables, result, batch, *, freeze_batch_stats, steps=5):
    tx = optim.tgd(optax.adamw(1e-2, weight_decay=1e-2), result.mask)
    state = step.create_train_state(variables, tx, result)
    fn = jax.jit(functools.partial(
        step.train_step, model=model, tx=tx, freeze_batch_stats=freeze_batch_stats))
    for _ in range(steps):
        state, metrics = fn(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    return state


def test_tgd_step_keeps_frozen_params_and_statistics(setup):
    model, variables, result, batch = setup
    state = _train(model, variables, result, batch, freeze_batch_stats=True)
    assert int(state.step) == 5
    for fb, fa, rb, ra in frozen_and_retrained(result.mask, variables["params"], state.params):
        assert fb.tobytes() == fa.tobytes()
        assert np.all(rb != ra)
    for bn, conv in [("bn2", "conv2"), ("bn3", "conv3"), ("bn4", "conv4")]:
        channel = np.asarray(result.channels[conv])
        for stat in ("mean", "var"):
            old = np.asarray(variables["batch_stats"][bn][stat])
            new = np.asarray(state.batch_stats[bn][stat])
            assert old[~channel].tobytes() == new[~channel].tobytes()
            assert np.all(old[channel] != new[channel])


def test_batch_stat_freezing_is_switchable(setup):
    model, variables, result, batch = setup
    state = _train(model, variables, result, batch, freeze_batch_stats=False, steps=1)
    channel = np.asarray(result.channels["conv3"])
    assert (~channel).any()
    old = np.asarray(variables["batch_stats"]["bn3"]["mean"])
    assert np.all(np.asarray(state.batch_stats["bn3"]["mean"])[~channel] != old[~channel])


def test_plain_training_without_mask(setup):
    model, variables, _, batch = setup
    tx = optax.adam(1e-2)
    state = step.create_train_state(variables, tx)
    fn = jax.jit(functools.partial(step.train_step, model=model, tx=tx))
    before = float(step.eval_step(state, batch, model=model)["loss"])
    for _ in range(20):
        state, _ = fn(state, batch)
    assert optim.find_mask(state.opt_state) is None
    assert float(step.eval_step(state, batch, model=model)["loss"]) < before


@pytest.mark.parametrize("name, reference", [
    ("mse", lambda p, t: np.mean((p - t) ** 2)),
    ("mae", lambda p, t: np.mean(np.abs(p - t))),
])
def test_losses_by_name_match_numpy(setup, name, reference):
    model, variables, _, batch = setup
    state = step.create_train_state(variables, optax.sgd(0.0))
    prediction = np.asarray(model.apply(variables, batch["inputs"], train=False), np.float64)
    expected = reference(prediction, np.asarray(batch["targets"], np.float64))
    got = step.eval_step(state, batch, model=model, loss=step.LOSSES[name])["loss"]
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
