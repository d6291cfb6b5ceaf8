"""The paper's 2.5D DnCNN: shapes, residual output, parameter count, layer layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgd_jax.pet.models import PAPER_FEATURES, DnCNN, scaled_features
from tgd_jax.topology import validate_topology


def _shapes(model, size=32):
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )


def test_paper_parameter_count():
    params = _shapes(DnCNN())["params"]
    # By hand: 3x3 conv = 9 * C_in * C_out weights (+ C_out biases where no BatchNorm
    # follows: conv1 and conv8); BN = scale + offset.
    expected = {
        "conv1": 9 * 3 * 64 + 64,  # 1,792
        "conv2": 9 * 64 * 64,  # 36,864
        "conv3": 9 * 64 * 128,  # 73,728
        "conv4": 9 * 128 * 128,  # 147,456
        "conv5": 9 * 128 * 128,  # 147,456
        "conv6": 9 * 128 * 256,  # 294,912
        "conv7": 9 * 256 * 256,  # 589,824
        "conv8": 9 * 256 * 3 + 3,  # 6,915
        "bn2": 2 * 64, "bn3": 2 * 128, "bn4": 2 * 128, "bn5": 2 * 128,
        "bn6": 2 * 256, "bn7": 2 * 256,
    }
    got = {name: sum(x.size for x in jax.tree.leaves(p)) for name, p in params.items()}
    assert got == expected
    assert sum(got.values()) == 1_300_867


def test_layer_layout_matches_topology():
    model = DnCNN(use_gates=True)
    variables = _shapes(model)
    assert sorted(variables["batch_stats"]) == [f"bn{i}" for i in range(2, 8)]
    gates = sorted(variables["tgd"])
    assert gates == sorted(g for node in model.topology() for g in node.gates)
    assert "gate_conv8" not in gates and "gate_conv1" in gates and "gate_bn1" not in gates
    validate_topology(variables["params"], model.topology())


def test_width_multiplier():
    assert scaled_features(PAPER_FEATURES, 0.25) == (16, 16, 32, 32, 32, 64, 64, 3)
    params = _shapes(DnCNN(width_multiplier=0.25))["params"]
    assert params["conv7"]["kernel"].shape == (3, 3, 64, 64)
    assert params["conv8"]["kernel"].shape == (3, 3, 64, 3)
    with pytest.raises(ValueError, match="width multiplier"):
        scaled_features(PAPER_FEATURES, 0.0)


def test_shapes_and_residual_output():
    model = DnCNN(features=(8, 8, 8, 3))
    x = jax.random.normal(jax.random.key(1), (2, 16, 12, 3))
    variables = model.init(jax.random.key(2), x, train=False)
    y, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert y.shape == x.shape
    # A zero noise predictor leaves the input unchanged: output = input - noise.
    params = dict(variables["params"])
    params["conv4"] = jax.tree.map(jnp.zeros_like, params["conv4"])
    y0 = model.apply({**variables, "params": params}, x)
    np.testing.assert_array_equal(y0, x)
    # A constant predicted noise b is subtracted from every pixel.
    params["conv4"] = {**params["conv4"], "bias": jnp.array([0.5, -1.0, 2.0])}
    y1 = model.apply({**variables, "params": params}, x)
    np.testing.assert_allclose(y1, x - jnp.array([0.5, -1.0, 2.0]), atol=1e-6)


def test_train_mode_updates_running_statistics():
    model = DnCNN(features=(4, 4, 3))
    x = 2.0 + jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    variables = model.init(jax.random.key(4), x, train=False)
    _, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert np.all(new["batch_stats"]["bn2"]["mean"] != variables["batch_stats"]["bn2"]["mean"])


def test_rejects_wrong_input_channels():
    model = DnCNN(features=(4, 4, 3))
    with pytest.raises(ValueError, match=r"\(batch, height, width, 3\)"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
