"""The optax mask transformation: frozen elements stay bit-identical; order matters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import frozen_and_retrained

from tgd_jax.methods import tgd_plan
from tgd_jax.optim import RetrainOnlyState, find_mask, replace_mask, retrain_only, tgd


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
    assert isinstance(state[-1], RetrainOnlyState)
    mask_leaves = jax.tree.leaves(mask)
    state_leaves = jax.tree.leaves(state)
    # every mask leaf is a state leaf, so checkpointing the state saves the mask
    assert sum(leaf.dtype == jnp.bool_ for leaf in state_leaves) == len(mask_leaves)
