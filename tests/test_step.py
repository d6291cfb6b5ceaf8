"""The TGD training step: every frozen element, params and BN statistics, stays put."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import frozen_and_retrained
from flax import linen as nn

from tgd_jax import optim
from tgd_jax.methods import plan_finetune, tgd_plan
from tgd_jax.pet.models import DnCNN
from tgd_jax.topology import sequential_topology
from tgd_jax.train import step


@pytest.fixture(scope="module")
def setup(tiny_dncnn):
    model, variables = tiny_dncnn
    result = tgd_plan(variables["params"], model.topology(), 0.5, mode="paper",
                      batch_stats=variables["batch_stats"])
    x = 1.0 + jax.random.normal(jax.random.key(11), (4, 8, 8, 3))
    batch = {"inputs": x, "targets": 0.5 * x}
    return model, variables, result, batch


def _train(model, variables, result, batch, *, freeze_batch_stats, steps=5):
    tx = result.optimizer(optax.adamw(1e-2, weight_decay=1e-2))
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


def _regression_batch(i, size=8):
    x = 1.0 + jax.random.normal(jax.random.key(i), (size, 8, 8, 3))
    return {"inputs": x, "targets": 0.3 * x}


def _train_mode_loss(model, state, batch):
    prediction, _ = step.apply_train(state, state.params, batch["inputs"], model=model)
    return float(jnp.mean((prediction - batch["targets"]) ** 2))


@pytest.mark.parametrize("frozen_bn", ["running", "batch"])
def test_the_network_trained_is_the_network_evaluated(frozen_bn):
    # 200 TGD steps at phi 0.5 from a fresh tiny DnCNN. With the default (frozen channels
    # normalise with their running statistics, which stay frozen) the training-mode and
    # inference-mode losses of the result agree; with batch statistics for frozen channels
    # their frozen running statistics go stale as the retrained maps change, and the
    # network evaluated is not the one optimised.
    model = DnCNN(features=(8, 8, 12, 6, 3))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    plan = tgd_plan(variables["params"], model.topology(), 0.5, frozen_bn=frozen_bn,
                    batch_stats=variables["batch_stats"])
    assert plan.summary["frozen_bn"] == frozen_bn
    if frozen_bn == "running":
        assert plan_finetune("tgd", variables["params"], model.topology()).summary[
            "frozen_bn"] == "running"  # the default
    tx = plan.optimizer(optax.adam(3e-3))
    state = step.create_train_state(variables, tx, plan)
    fn = jax.jit(functools.partial(step.train_step, model=model, tx=tx))
    for i in range(200):
        state, _ = fn(state, _regression_batch(1000 + i))
    held_out = _regression_batch(5000)
    train_mode = _train_mode_loss(model, state, held_out)
    inference = float(step.eval_step(state, held_out, model=model)["loss"])
    gap = abs(train_mode - inference) / inference
    if frozen_bn == "running":
        assert gap < 0.01, (train_mode, inference)  # measured 0.02 %
    else:
        assert gap > 0.05, (train_mode, inference)  # measured 11 %


class _AffineFreeBN(nn.Module):
    """conv -> BatchNorm without scale/offset -> ReLU, twice, then a linear conv."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        for i, width in enumerate((6, 5)):
            x = nn.Conv(width, (3, 3), use_bias=False, name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False,
                             name=f"bn{i}")(x)
            x = nn.relu(x)
        return nn.Conv(3, (3, 3), name="out")(x)


def test_batchnorm_without_scale_and_offset_follows_its_channels():
    model = _AffineFreeBN()
    variables = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 3)))
    assert "bn0" not in variables["params"]  # only statistics: nothing to name in params
    topology = sequential_topology(["conv0", "conv1", "out"],
                                   norms={"conv0": "bn0", "conv1": "bn1"})
    plan = tgd_plan(variables["params"], topology, 0.6, frozen_bn="batch",
                    batch_stats=variables["batch_stats"])
    tx = plan.optimizer(optax.adam(1e-2))
    state = step.create_train_state(variables, tx, plan)
    fn = jax.jit(functools.partial(step.train_step, model=model, tx=tx))
    for i in range(3):
        state, _ = fn(state, _regression_batch(i))
    checked = 0
    for bn, conv in (("bn0", "conv0"), ("bn1", "conv1")):
        channel = np.asarray(plan.channels[conv])
        for stat in ("mean", "var"):
            old = np.asarray(variables["batch_stats"][bn][stat])
            new = np.asarray(state.batch_stats[bn][stat])
            assert old[~channel].tobytes() == new[~channel].tobytes()
            assert np.all(old[channel] != new[channel])  # retrained: their statistics move
            checked += int(channel.any() and (~channel).any())
    assert checked > 0


def test_the_optimizer_must_carry_the_plan(setup):
    model, variables, result, _ = setup
    with pytest.raises(ValueError, match="does not carry the plan's mask"):
        step.create_train_state(variables, optax.adam(1e-3), result)
    other = tgd_plan(variables["params"], model.topology(), 0.9,
                     batch_stats=variables["batch_stats"])
    with pytest.raises(ValueError, match="carries another mask"):
        step.create_train_state(variables, other.optimizer(optax.adam(1e-3)), result)
    without_stats = tgd_plan(variables["params"], model.topology(), 0.5, mode="paper")
    with pytest.raises(ValueError, match="made without them"):
        step.create_train_state(variables, without_stats.optimizer(optax.adam(1e-3)),
                                without_stats)


def test_donated_steps_work_on_fresh_and_replaced_plans(setup):
    model, variables, result, batch = setup
    tx = result.optimizer(optax.adam(1e-3))
    fn = jax.jit(functools.partial(step.train_step, model=model, tx=tx), donate_argnums=0)
    state = step.create_train_state(variables, tx, result)
    state, _ = fn(state, batch)  # "Attempt to donate the same buffer twice" before
    second = tgd_plan(state.params, model.topology(), 0.7, mode="paper",
                      batch_stats=state.batch_stats)
    state = step.replace_plan(state, second, tx)
    state, _ = fn(state, batch)
    assert int(state.step) == 2


def test_a_new_round_starts_with_a_fresh_optimizer(tiny_dncnn):
    model, variables = tiny_dncnn
    topology = model.topology()
    first = tgd_plan(variables["params"], topology, 0.4, mode="paper",
                     batch_stats=variables["batch_stats"])
    lr, steps = 1e-2, 20
    tx = first.optimizer(num_steps=steps, learning_rate=lr, schedule="cosine")
    fn = jax.jit(functools.partial(step.train_step, model=model, tx=tx))
    state = step.create_train_state(variables, tx, first)
    for i in range(steps):  # the whole cosine schedule: its learning rate is now 0
        state, _ = fn(state, _regression_batch(i, 4))
    second = tgd_plan(state.params, topology, 0.7, mode="paper",
                      batch_stats=state.batch_stats)
    new = {conv: np.asarray(second.channels[conv]) & ~np.asarray(first.channels[conv])
           for conv in first.channels}
    assert any(m.any() for m in new.values()), "the test needs newly retrained channels"
    state = step.replace_plan(state, second, tx)
    before = jax.device_get(state.params)
    state, _ = fn(state, _regression_batch(99, 4))
    after = jax.device_get(state.params)
    for conv, m in new.items():
        if not m.any():
            continue
        delta = np.abs(after[conv]["kernel"] - before[conv]["kernel"])[..., m]
        # fresh Adam's first step is lr * g / |g| = lr per element (up to epsilon); kept
        # moments gave 0 (finished schedule) or several times lr (paper mode)
        assert np.all(delta > 0.5 * lr) and np.all(delta < 1.01 * lr), (conv, delta.max())
    with pytest.raises(ValueError, match="different tree structure"):
        step.replace_plan(state, dataclasses.replace(second, gates={}), tx)
