"""The backward-only TGD gate: identity forward, masked cotangent backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tgd_jax import masks
from tgd_jax.gate import TGDGate, tgd_gate
from tgd_jax.methods import tgd_plan
from tgd_jax.pet.models import DnCNN


def test_vjp_is_the_masked_cotangent():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 5))
    ct = jax.random.normal(jax.random.key(1), x.shape)
    mask = jnp.array([True, False, True, False, False])
    y, vjp = jax.vjp(lambda v: tgd_gate(v, mask), x)
    assert y.tobytes() == x.tobytes()
    (dx,) = vjp(ct)
    np.testing.assert_array_equal(dx, np.where(mask, ct, 0.0))
    # float masks work the same way
    (dx_f,) = jax.vjp(lambda v: tgd_gate(v, mask.astype(jnp.float32)), x)[1](ct)
    np.testing.assert_array_equal(dx_f, dx)


@pytest.fixture(scope="module")
def setup(tiny_dncnn):
    model, variables = tiny_dncnn
    result = tgd_plan(variables["params"], model.topology(), 0.5, mode="paper",
                      batch_stats=variables["batch_stats"])
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    y = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    return model, variables, result, x, y


def _grads(model, variables, x, y, gates=None, train=True):
    def loss(params):
        v = {**variables, "params": params}
        if gates is None:
            v.pop("tgd", None)
        else:
            v["tgd"] = gates
        out, _ = model.apply(v, x, train=train, mutable=["batch_stats"])
        return jnp.mean((out - y) ** 2)

    return jax.jit(jax.grad(loss))(variables["params"])


@pytest.mark.parametrize("train", [True, False])
def test_forward_identical_with_and_without_gates(setup, train):
    model, variables, result, x, _ = setup
    plain = DnCNN(features=model.features, use_gates=False)
    v = {k: val for k, val in variables.items() if k != "tgd"}
    expected, _ = plain.apply(v, x, train=train, mutable=["batch_stats"])
    gates = masks.gate_variables(model.topology(), result.channels)
    got, _ = model.apply({**v, "tgd": gates}, x, train=train, mutable=["batch_stats"])
    assert np.asarray(got).tobytes() == np.asarray(expected).tobytes()


def test_gates_give_frozen_kernels_exactly_zero_gradient(setup):
    model, variables, result, x, y = setup
    gates = masks.gate_variables(model.topology(), result.channels, mode="paper")
    grads = _grads(model, variables, x, y, gates)
    checked = 0
    for node in model.topology()[:-1]:  # the last conv is frozen by the optax mask only
        channel = np.asarray(result.channels[node.conv])
        leaves = [grads[node.conv][name] for name in ("kernel", "bias") if name in grads[node.conv]]
        if node.norm:
            leaves += [grads[node.norm]["scale"], grads[node.norm]["bias"]]
        for g in leaves:
            g = np.asarray(g)
            assert np.all(g[..., ~channel] == 0.0)
            assert np.any(g[..., channel] != 0.0) or not channel.any()
            checked += int((~channel).sum())
    assert checked > 0


def _reference_gate(next_fun, args, kwargs, context):
    """Independent TGD layer: frozen channels pass their value through stop_gradient."""
    if isinstance(context.module, TGDGate) and context.method_name == "__call__":
        (h,) = args
        mask = context.module.get_variable("tgd", "mask")
        return jnp.where(mask, h, jax.lax.stop_gradient(h))
    return next_fun(*args, **kwargs)


def test_paper_gradients_match_stop_gradient_reference(setup):
    model, variables, result, x, y = setup
    gates = masks.gate_variables(model.topology(), result.channels, mode="paper")
    grads = _grads(model, variables, x, y, gates)
    with nn.intercept_methods(_reference_gate):
        reference = _grads(model, variables, x, y, gates)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


def test_paper_mode_changes_earlier_gradients_projected_does_not(setup):
    model, variables, result, x, y = setup
    topology = model.topology()
    full = _grads(model, variables, x, y, gates=None)
    paper = _grads(model, variables, x, y, masks.gate_variables(topology, result.channels, "paper"))
    projected = _grads(
        model, variables, x, y, masks.gate_variables(topology, result.channels, "projected")
    )
    # Projected mode: gradients are the full gradients; only the optax mask will act.
    for f, p in zip(jax.tree.leaves(full), jax.tree.leaves(projected), strict=True):
        np.testing.assert_array_equal(f, p)
    # Paper mode: a retrained channel of an EARLY layer gets a different gradient, since
    # the frozen channels of later layers no longer pass gradient back.
    channel = np.asarray(result.channels["conv2"])
    assert channel.any()
    kernel_full = np.asarray(full["conv2"]["kernel"])[..., channel]
    kernel_paper = np.asarray(paper["conv2"]["kernel"])[..., channel]
    assert np.max(np.abs(kernel_full - kernel_paper)) > 1e-3 * np.max(np.abs(kernel_full))
    # ... while the last gated layer (whose output only the ungated last conv reads) agrees.
    channel4 = np.asarray(result.channels["conv4"])
    np.testing.assert_allclose(
        np.asarray(paper["conv4"]["kernel"])[..., channel4],
        np.asarray(full["conv4"]["kernel"])[..., channel4],
        rtol=1e-5, atol=1e-7,
    )


def test_gate_module_is_identity_without_collection(setup):
    model, variables, _, x, y = setup
    plain = DnCNN(features=model.features, use_gates=False)
    v = {k: val for k, val in variables.items() if k != "tgd"}
    np.testing.assert_array_equal(model.apply(v, x), plain.apply(v, x))


def test_gate_mask_shape_is_checked(setup):
    model, variables, _, x, _ = setup
    gates = jax.tree.map(lambda m: m, variables["tgd"])
    gates["gate_conv2"]["mask"] = jnp.ones((3,), bool)
    with pytest.raises(ValueError, match="gate_conv2.*does not match 8 channels"):
        model.apply({**variables, "tgd": gates}, x)


def test_float_masks_scale_and_forward_mode_agrees_with_reverse():
    from tgd_jax.gate import tgd_gate

    mask = jnp.array([0.5, 0.0, 2.0])
    w = jnp.array([1.0, -3.0, 0.25])
    f = lambda x: jnp.sum(w * jnp.sin(tgd_gate(x, mask)))  # noqa: E731
    x = jnp.array([0.3, -0.2, 1.1])
    expected = w * jnp.cos(x) * mask  # the chain rule with the gate's derivative diag(mask)
    np.testing.assert_allclose(jax.grad(f)(x), expected, rtol=1e-6)
    # forward mode: one tangent per basis vector gives the same gradient (it raised before)
    forward = jnp.stack([jax.jvp(f, (x,), (e,))[1] for e in jnp.eye(3)])
    np.testing.assert_allclose(forward, expected, rtol=1e-6)
    np.testing.assert_allclose(jax.jacfwd(f)(x), jax.jacrev(f)(x), rtol=1e-6)


def test_automatic_gates_equal_explicit_gate_modules_bit_for_bit():
    from tgd_jax import gated, trace_topology

    features = (8, 8, 12, 6, 3)
    explicit_model, plain_model = DnCNN(features=features, use_gates=True), DnCNN(
        features=features)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    variables = explicit_model.init(jax.random.key(0), x[:1])
    params, stats = variables["params"], variables["batch_stats"]
    explicit = tgd_plan(params, explicit_model.topology(), 0.5, mode="paper",
                        batch_stats=stats)
    graph = trace_topology(plain_model.apply, {"params": params, "batch_stats": stats}, x,
                           train=False)
    auto = tgd_plan(params, graph, 0.5, mode="paper", batch_stats=stats)
    assert auto.auto_gates and not explicit.auto_gates
    apply = gated(plain_model.apply, auto)

    def loss(p, fn, gates):
        out, _ = fn({"params": p, "batch_stats": stats, **gates}, x, train=True,
                    mutable=["batch_stats"])
        return jnp.mean((out - 0.5 * x) ** 2)

    a = jax.jit(jax.grad(lambda p: loss(p, explicit_model.apply, {"tgd": explicit.gates})))(
        params)
    b = jax.jit(jax.grad(lambda p: loss(p, apply, {})))(params)
    c = jax.jit(jax.grad(lambda p: loss(p, plain_model.apply, {})))(params)
    for ga, gb in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(ga).tobytes() == np.asarray(gb).tobytes()
    assert any(not np.array_equal(ga, gc) for ga, gc in zip(jax.tree.leaves(a),
                                                           jax.tree.leaves(c), strict=True))
