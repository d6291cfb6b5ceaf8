"""KSE against a brute-force NumPy reference, a hand-checked case and its degenerate cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_kse

from tgd_jax import kse

SHAPES = [
    (3, 3, 4, 6),  # C_in < C_out
    (3, 3, 6, 4),  # C_in > C_out
    (3, 3, 5, 5),  # square: the shape on which the reference code's bug hides
    (1, 1, 3, 7),
    (5, 5, 2, 3),
    (3, 3, 8, 3),  # like the DnCNN's conv8: N = 3 < k + 1
    (2, 3, 3, 4, 9),  # a 3D conv kernel
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("alpha,k", [(1.0, 5), (0.5, 2)])
def test_matches_bruteforce_reference(shape, alpha, k):
    w = jax.random.normal(jax.random.key(sum(shape)), shape)
    s, dm, e, score = reference_kse(w, alpha=alpha, k=k)
    np.testing.assert_allclose(kse.kernel_sparsity(w), s, rtol=1e-5)
    np.testing.assert_allclose(kse.kernel_density(w, k=k), dm, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kse.kernel_entropy(w, k=k), e, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kse.kse_scores(w, alpha=alpha, k=k), score, atol=1e-5)


def test_groups_are_input_channels_not_output_filters():
    # Make input channel 0 all zeros and input channel 1 large: per input channel, 0 must
    # score 0 and 1 must score 1, whatever the output filters look like.
    w = np.array(jax.random.normal(jax.random.key(1), (3, 3, 4, 4)))
    w[:, :, 0, :] = 0.0
    w[:, :, 1, :] *= 10.0
    score = np.asarray(kse.kse_scores(w))
    assert score[0] == 0.0 and score[1] == 1.0


def _hand_kernel() -> np.ndarray:
    # 1x1 kernels (scalars), C_in = 3, C_out = 3: rows are input channels.
    values = np.array([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0], [0.0, 0.0, 2.0]])
    return values.reshape(1, 1, 3, 3)


def test_hand_checked_case():
    w = _hand_kernel()
    # sparsity: |0|+|1|+|3| = 4, 2+2+2 = 6, 0+0+2 = 2
    np.testing.assert_allclose(kse.kernel_sparsity(w), [4.0, 6.0, 2.0])
    # k = 1: nearest neighbour distances. Channel 0: 0->1: 1, 1->0: 1, 3->1: 2.
    # Channel 1: identical kernels, 0. Channel 2: 0->0: 0, 0->0: 0, 2->0: 2.
    np.testing.assert_allclose(kse.kernel_density(w, k=1), [[1, 1, 2], [0, 0, 0], [0, 0, 2]])
    # k = 2 (all others): channel 0: 1+3, 1+2, 3+2.
    np.testing.assert_allclose(kse.kernel_density(w, k=2)[0], [4.0, 3.0, 5.0])
    # k = 1 entropy: channel 0 p = (1/4, 1/4, 1/2) -> 1.5 bits; channel 1 no diversity -> 0;
    # channel 2 p = (0, 0, 1) -> 0.
    np.testing.assert_allclose(kse.kernel_entropy(w, k=1), [1.5, 0.0, 0.0], atol=1e-6)
    # s' = (0.5, 1, 0), e' = (1, 0, 0): sqrt(0.5 / 2) = 0.5, sqrt(1 / 1) = 1, 0.
    np.testing.assert_allclose(kse.kse_scores(w, k=1), [0.5, 1.0, 0.0], atol=1e-6)


def test_invariant_to_permuting_output_kernels():
    w = jax.random.normal(jax.random.key(2), (3, 3, 6, 10))
    perm = jax.random.permutation(jax.random.key(3), 10)
    np.testing.assert_allclose(kse.kse_scores(w), kse.kse_scores(w[..., perm]), atol=1e-5)


def test_jit_and_eager_agree():
    w = jax.random.normal(jax.random.key(4), (3, 3, 7, 9))
    jitted = kse.kse_scores(w, alpha=0.7, k=3)
    with jax.disable_jit():
        eager = kse.kse_scores(w, alpha=0.7, k=3)
    np.testing.assert_allclose(jitted, eager, atol=1e-5)
    # alpha may be traced (no recompile per value).
    traced = jax.jit(lambda a: kse.kse_scores(w, alpha=a, k=3))(0.7)
    np.testing.assert_allclose(traced, jitted, atol=1e-5)


def _finite_in_unit_interval(x) -> bool:
    x = np.asarray(x)
    return bool(np.all(np.isfinite(x)) and x.min() >= 0.0 and x.max() <= 1.0)


def test_identical_kernels_have_zero_density_and_entropy():
    w = np.tile(np.arange(9.0).reshape(3, 3, 1, 1), (1, 1, 4, 6))
    w[:, :, 2, :] *= 2.0
    assert np.all(np.asarray(kse.kernel_density(w)) == 0.0)
    assert np.all(np.asarray(kse.kernel_entropy(w)) == 0.0)
    score = kse.kse_scores(w)
    assert _finite_in_unit_interval(score)
    # entropy constant at 0 -> score ordered by sparsity alone: channel 2 is the largest.
    assert np.asarray(score)[2] == 1.0


def test_constant_scores_are_all_ones():
    # Every input channel sees the same multiset of kernels: no channel can be told apart.
    base = np.asarray(jax.random.normal(jax.random.key(5), (3, 3, 1, 5)))
    w = np.concatenate([base[..., np.roll(np.arange(5), r)] for r in range(4)], axis=2)
    np.testing.assert_array_equal(kse.kse_scores(w), np.ones(4))  # exactly: see below


def test_extremes_are_exactly_zero_and_one():
    # The normalisation promises one channel at exactly 0 and one at exactly 1; XLA's
    # division by a reciprocal once gave 0.99999994 in 5 of these 20 layers.
    for seed in range(20):
        scores = np.asarray(kse.kse_scores(jax.random.normal(jax.random.key(seed),
                                                             (3, 3, 8, 16))))
        assert scores.max() == 1.0 and scores.min() == 0.0, (seed, scores.min(), scores.max())
    # identical channels score exactly 1, so even phi = 1 keeps them frozen
    w = np.ones((3, 3, 4, 4), np.float32) * np.arange(1, 5, dtype=np.float32)
    assert not np.any(np.asarray(kse.kse_scores(w)) < 1.0)


@pytest.mark.parametrize("alpha", [-1.0, -2.0, -0.1, float("nan"), float("inf")])
def test_rejects_alpha_that_could_give_nan(alpha):
    with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
        kse.kse_scores(jnp.ones((3, 3, 2, 4)), alpha=alpha)


def test_all_zero_kernels_score_zero():
    np.testing.assert_array_equal(kse.kse_scores(np.zeros((3, 3, 5, 4))), np.zeros(5))


def test_single_input_channel():
    w = jax.random.normal(jax.random.key(6), (3, 3, 1, 8))
    np.testing.assert_array_equal(kse.kse_scores(w), [1.0])
    np.testing.assert_array_equal(kse.kse_scores(jnp.zeros((3, 3, 1, 8))), [0.0])


def test_single_output_kernel_has_no_neighbours():
    w = jax.random.normal(jax.random.key(7), (3, 3, 4, 1))
    assert kse.effective_k(5, 1) == 0
    np.testing.assert_array_equal(kse.kernel_density(w), np.zeros((4, 1)))
    np.testing.assert_array_equal(kse.kernel_entropy(w), np.zeros(4))
    assert _finite_in_unit_interval(kse.kse_scores(w))


def test_k_is_capped_at_group_size_minus_one():
    w = jax.random.normal(jax.random.key(8), (3, 3, 4, 3))
    assert kse.effective_k(5, 3) == 2
    np.testing.assert_allclose(kse.kse_scores(w, k=5), kse.kse_scores(w, k=2), atol=0)


def test_minmax_normalize_cases():
    np.testing.assert_allclose(kse.minmax_normalize(jnp.array([2.0, 4.0, 3.0])), [0, 1, 0.5])
    np.testing.assert_array_equal(kse.minmax_normalize(jnp.array([3.0, 3.0])), [1.0, 1.0])
    np.testing.assert_array_equal(kse.minmax_normalize(jnp.zeros(3)), [0.0, 0.0, 0.0])


@pytest.mark.parametrize("bad", [(3, 3), (9,)])
def test_rejects_non_conv_kernels(bad):
    with pytest.raises(ValueError, match="C_in, C_out"):
        kse.kse_scores(jnp.ones(bad))


def test_rejects_k_below_one():
    with pytest.raises(ValueError, match="k >= 1"):
        kse.kse_scores(jnp.ones((3, 3, 2, 2)), k=0)


@pytest.mark.parametrize("groups, per_in, c_out", [(2, 3, 6), (4, 1, 4), (4, 1, 8), (3, 2, 9)],
                         ids=["grouped", "depthwise", "depthwise-x2", "grouped-3"])
def test_a_grouped_kernel_rates_each_input_channel_over_its_own_groups_kernels(
        groups, per_in, c_out):
    from tgd_jax.graph import Layer, kernel_by_input

    w = jax.random.normal(jax.random.key(groups + c_out), (3, 3, per_in, c_out))
    c_in = per_in * groups
    layer = Layer("g", "g/kernel", 2, 3, "conv", tuple(range(c_in)),
                  tuple(range(c_in, c_in + c_out)), groups=groups)
    s, dm, e, score = reference_kse(w, alpha=1.0, k=5, groups=groups)
    by_input = kernel_by_input(w, layer)
    assert by_input.shape == (3, 3, c_in, c_out // groups)
    np.testing.assert_allclose(kse.kernel_sparsity(by_input), s, rtol=1e-5)
    np.testing.assert_allclose(kse.kernel_density(by_input, k=5), dm, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kse.kse_scores(by_input), score, atol=1e-5)
