"""The optax mask transformation: frozen elements stay bit-identical; order matters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import frozen_and_retrained

from tgd_jax.methods import tgd_plan
from tgd_jax.optim import (
    RetrainOnlyState,
    find_mask,
    learning_rate_schedule,
    make_optimizer,
    replace_mask,
    retrain_only,
    tgd,
)


@pytest.fixture(scope="module")
def problem(tiny_dncnn):
    model, variables = tiny_dncnn
    params = variables["params"]
    mask = tgd_plan(params, model.topology(), 0.5).mask
    keys = jax.random.split(jax.random.key(7), len(jax.tree.leaves(params)))
    targets = jax.tree.unflatten(
        jax.tree.structure(params),
        [jax.random.normal(k, p.shape) for k, p in zip(keys, jax.tree.leaves(params), strict=True)],
    )
    return params, mask, targets


def _loss(params, targets):
    return sum(
        jnp.sum((p - t) ** 2)
        for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(targets), strict=True)
    )


def _run(tx, params, targets, steps=50):
    @jax.jit
    def step(p, s):
        g = jax.grad(_loss)(p, targets)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize(
    "inner",
    [optax.adamw(1e-2, weight_decay=0.1), optax.sgd(1e-2, momentum=0.9)],
    ids=["adamw", "sgd_momentum"],
)
def test_frozen_elements_bit_identical(problem, inner):
    params, mask, targets = problem
    final, _ = _run(tgd(inner, mask), params, targets)
    retrained = 0
    for fb, fa, rb, ra in frozen_and_retrained(mask, params, final):
        assert fb.tobytes() == fa.tobytes()  # bit-identical, not just close
        assert np.all(rb != ra)
        retrained += rb.size
    assert retrained > 0


def test_mask_before_adamw_does_not_protect(problem):
    params, mask, targets = problem
    wrong = optax.chain(retrain_only(mask), optax.adamw(1e-2, weight_decay=0.1))
    final, _ = _run(wrong, params, targets, steps=5)
    moved = sum(int(np.sum(fb != fa)) for fb, fa, _, _ in frozen_and_retrained(mask, params, final))
    assert moved > 0  # decoupled weight decay moves the "frozen" weights


def test_none_leaf_is_frozen_and_nan_cannot_leak():
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    mask = {"a": None, "b": jnp.array([True, False])}
    tx = retrain_only(mask)
    updates = {"a": jnp.full(3, jnp.nan), "b": jnp.array([[1.0, jnp.nan], [2.0, jnp.inf]])}
    out, _ = tx.update(updates, tx.init(params))
    np.testing.assert_array_equal(out["a"], np.zeros(3))
    np.testing.assert_array_equal(out["b"], [[1.0, 0.0], [2.0, 0.0]])


def test_replace_mask_without_recompiling(problem):
    params, mask, targets = problem
    tx = tgd(optax.adam(1e-2), mask)
    flipped = jax.tree.map(lambda m: ~m, mask)  # same structure, new values

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(_loss)(p, targets), s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    p1, state = step(params, state)
    state = replace_mask(state, flipped)
    p2, state = step(p1, state)
    assert step._cache_size() == 1
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), find_mask(state), flipped))
    for fb, fa, rb, ra in frozen_and_retrained(flipped, p1, p2):
        assert fb.tobytes() == fa.tobytes()
        assert np.all(rb != ra)
    with pytest.raises(ValueError, match="different tree structure"):
        replace_mask(state, {"conv1": mask["conv1"]})
    with pytest.raises(ValueError, match="no RetrainOnlyState"):
        replace_mask(optax.adam(1e-2).init(params), mask)


def test_mask_is_part_of_the_optimizer_state(problem):
    params, mask, _ = problem
    state = tgd(optax.adam(1e-3), mask).init(params)
    assert isinstance(state[0], RetrainOnlyState) and isinstance(state[-1], RetrainOnlyState)
    mask_leaves = jax.tree.leaves(mask)
    state_leaves = jax.tree.leaves(state)
    # every mask leaf is a state leaf (once per side), so checkpointing the state saves it
    assert sum(leaf.dtype == jnp.bool_ for leaf in state_leaves) == 2 * len(mask_leaves)
    # ... each in a buffer of its own, so that a jitted step can donate the state
    pointers = [leaf.unsafe_buffer_pointer() for leaf in state_leaves]
    assert len(set(pointers)) == len(pointers)


def test_clipping_and_l2_count_retrained_elements_only():
    # One retrained bias (gradient -1 before clipping) beside a frozen element whose
    # gradient is 0 or 100: the retrained update must not depend on the frozen one.
    params = {"conv": {"kernel": jnp.full((1, 1, 1, 2), 3.0), "bias": jnp.zeros(2)}}
    mask = {"conv": {"kernel": jnp.array([[[[False, False]]]]), "bias": jnp.array([True, False])}}
    updates = {}
    for frozen_grad in (0.0, 100.0):
        grads = {"conv": {"kernel": jnp.full((1, 1, 1, 2), frozen_grad),
                          "bias": jnp.array([-1.0, frozen_grad])}}
        tx = make_optimizer(num_steps=1, name="sgd", momentum=0.0, learning_rate=0.5,
                            grad_clip=1.0, l2=10.0, mask=mask)
        u, _ = tx.update(grads, tx.init(params), params)
        updates[frozen_grad] = u
    # clipped over the retrained element alone (norm 1, not clipped), lr 0.5: +0.5; the L2
    # term of the frozen kernels (10 * 3 each) is not in the norm either
    np.testing.assert_array_equal(updates[100.0]["conv"]["bias"], [0.5, 0.0])
    np.testing.assert_array_equal(updates[0.0]["conv"]["bias"], [0.5, 0.0])
    np.testing.assert_array_equal(updates[100.0]["conv"]["kernel"], np.zeros((1, 1, 1, 2)))
    # tgd() around any clipping optimizer: the same
    tx = tgd(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5)), mask)
    grads = {"conv": {"kernel": jnp.full((1, 1, 1, 2), 100.0), "bias": jnp.array([-1.0, 100.0])}}
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(u["conv"]["bias"], [0.5, 0.0])


def test_weight_decay_needs_adamw_and_touches_kernels_only():
    with pytest.raises(ValueError, match="only 'adamw' applies"):
        make_optimizer(num_steps=1, name="adam", weight_decay=0.1)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        make_optimizer(num_steps=1, name="adamw", weight_decay=float("nan"))
    params = {"conv": {"kernel": jnp.ones((1, 1, 1, 2)), "bias": jnp.ones(2)},
              "bn": {"scale": jnp.ones(2)}}
    tx = make_optimizer(num_steps=1, name="adamw", weight_decay=0.5, learning_rate=0.1)
    zero = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(u["conv"]["kernel"], -0.05)  # lr * wd * w on kernels, as L2
    np.testing.assert_array_equal(u["conv"]["bias"], 0.0)
    np.testing.assert_array_equal(u["bn"]["scale"], 0.0)


@pytest.mark.parametrize("new", [{"w": None}, {"w": jnp.ones((1, 2), bool)},
                                 {"w": jnp.ones(3, bool)}], ids=["none", "rank", "size"])
def test_replace_mask_refuses_a_different_layout(new):
    state = tgd(optax.sgd(1.0), {"w": jnp.array([True, False])}).init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="new mask differs at 'w'"):
        replace_mask(state, new)


@pytest.mark.parametrize("decay_fraction, final", [(1.0, 0.0), (0.75, 0.01), (0.5, 0.1)])
def test_the_cosine_decays_over_its_share_of_the_steps_then_holds(decay_fraction, final):
    peak, steps = 2e-3, 200
    schedule = learning_rate_schedule(peak, "cosine", steps, decay_fraction=decay_fraction,
                                      final_lr_fraction=final)
    decay = round(decay_fraction * steps)
    for count in range(steps + 1):  # the formula, written out
        t = min(count, decay) / decay
        want = peak * (final + (1 - final) * 0.5 * (1 + np.cos(np.pi * t)))
        assert float(schedule(count)) == pytest.approx(want, abs=1e-6 * peak)  # float32
    held = [float(schedule(c)) for c in range(decay, steps + 1)]
    assert max(held) == min(held) == pytest.approx(final * peak, abs=1e-6 * peak)


@pytest.mark.parametrize("field, value", [("decay_fraction", 0.0), ("decay_fraction", 1.5),
                                          ("final_lr_fraction", 1.0),
                                          ("final_lr_fraction", float("nan"))])
def test_a_senseless_schedule_shape_is_refused(field, value):
    with pytest.raises(ValueError, match=f"optimizer.{field}"):
        make_optimizer(num_steps=10, schedule="cosine", **{field: value})


def test_l2_sp_is_the_gradient_of_a_penalty_toward_the_start():
    # Independent truth: jax.grad of loss + (s / 2) * ||kernel - kernel0||^2, kernels only.
    k = jax.random.split(jax.random.key(3), 4)
    start = {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4)),
                      "bias": jax.random.normal(k[1], (4,))},
             "bn": {"scale": jnp.ones(4)}}
    now = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(k[2], p.shape), start)
    target = jax.random.normal(k[3], (3, 3, 2, 4))

    def loss(p):
        return jnp.sum((p["conv"]["kernel"] - target) ** 2) + jnp.sum(p["conv"]["bias"] ** 2)

    strength = 0.7

    def penalised(p):
        return loss(p) + strength / 2 * jnp.sum((p["conv"]["kernel"]
                                                 - start["conv"]["kernel"]) ** 2)

    tx = make_optimizer(num_steps=1, name="sgd", momentum=0.0, learning_rate=1.0,
                        l2_sp=strength)
    state = tx.init(start)  # the anchor is what init sees
    u, state = tx.update(jax.grad(loss)(now), state, now)
    want = jax.tree.map(jnp.negative, jax.grad(penalised)(now))
    for got, ref in zip(jax.tree.leaves(u), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    # the anchor does not follow the weights: a second update still pulls toward the start
    u2, _ = tx.update(jax.grad(loss)(now), state, now)
    for got, ref in zip(jax.tree.leaves(u2), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_l2_sp_under_a_mask_leaves_frozen_elements_bit_identical(problem):
    params, mask, targets = problem
    start = jax.tree.map(lambda p: p + 1.0, params)  # the anchor: 1 away from every weight
    tx = make_optimizer(num_steps=50, learning_rate=1e-2, l2_sp=5.0, mask=mask)
    state = tx.init(start)
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    after = optax.apply_updates(params, u)
    moved = 0
    for fb, fa, rb, ra in frozen_and_retrained(mask, params, after):
        np.testing.assert_array_equal(fb, fa)
        moved += int(np.sum(ra != rb))
    assert moved > 0  # the retrained kernels were pulled toward the anchor


@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_a_negative_l2_sp_is_refused(value):
    with pytest.raises(ValueError, match="l2_sp must be >= 0"):
        make_optimizer(num_steps=1, l2_sp=value)


@pytest.mark.parametrize("warmup, decay_fraction", [(20, 1.0), (30, 0.75)])
def test_warm_up_rises_linearly_then_the_cosine_ends_where_it_would(warmup, decay_fraction):
    peak, steps = 2e-3, 200
    schedule = learning_rate_schedule(peak, "cosine", steps, warmup_steps=warmup,
                                      decay_fraction=decay_fraction, final_lr_fraction=0.01)
    decay = round(decay_fraction * steps)
    for count in range(steps + 1):  # the formula, written out
        if count < warmup:
            want = peak * count / warmup
        else:
            t = min(count - warmup, decay - warmup) / (decay - warmup)
            want = peak * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * t)))
        assert float(schedule(count)) == pytest.approx(want, abs=1e-6 * peak), count
    for bad in (-1, steps, 2.5):
        with pytest.raises(ValueError, match="optimizer.warmup_steps"):
            make_optimizer(num_steps=steps, schedule="cosine", warmup_steps=bad)


def test_a_warm_up_that_leaves_the_cosine_no_step_is_refused():
    with pytest.raises(ValueError, match="leaves no step for the cosine"):
        learning_rate_schedule(1e-3, "cosine", 1000, warmup_steps=200, decay_fraction=0.1)
    learning_rate_schedule(1e-3, "constant", 1000, warmup_steps=200, decay_fraction=0.1)


def test_the_gate_watch_passes_extra_arguments_through():
    from tgd_jax.optim import tgd, warn_if_ungated

    inner = optax.chain(optax.adam(1e-2), optax.contrib.reduce_on_plateau())
    tx = warn_if_ungated(tgd(inner, {"w": jnp.array([True, False])}),
                         {"w": (0, np.array([True, True]))}, lambda: None)
    params = {"w": jnp.ones(2)}
    updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params, value=jnp.array(1.0))
    assert float(updates["w"][1]) == 0.0
