"""The Gaussian post-filter baseline: the filter against a brute-force convolution, and the
gain at matched CoV against a brute-force sigma search."""

import numpy as np
import pytest

from tgd_jax.pet import baseline
from tgd_jax.pet.evaluate import lesion_bias, liver_cov


def _brute_filter(image: np.ndarray, sigma: float) -> np.ndarray:
    """Direct 2D sum over the kernel's support, symmetric edges, float64."""
    k = baseline.gaussian_kernel(sigma)
    half = k.size // 2
    padded = np.pad(image.astype(np.float64), half, mode="symmetric")
    out = np.zeros(image.shape)
    h, w = image.shape
    for i in range(k.size):
        for j in range(k.size):
            out += k[i] * k[j] * padded[i:i + h, j:j + w]
    return out


@pytest.mark.parametrize("sigma", [0.0, 0.4, 1.0, 2.5])
def test_filter_is_the_2d_gaussian_convolution(sigma):
    image = np.random.default_rng(0).normal(size=(24, 20)).astype(np.float32)
    got = baseline.gaussian_filter(image[None, None], sigma)[0, 0]
    np.testing.assert_allclose(got, _brute_filter(image, sigma), atol=2e-6)


def test_kernel_is_normalised_with_the_analytic_variance():
    for sigma in (1.0, 2.0, 3.0):  # a sampled Gaussian narrower than a pixel is not one
        k = baseline.gaussian_kernel(sigma)
        x = np.arange(k.size) - k.size // 2
        assert k.sum() == pytest.approx(1.0)
        assert (k * x ** 2).sum() == pytest.approx(sigma ** 2, rel=2e-3)  # truncated at 4 sd


def test_filter_keeps_slices_apart_and_refuses_bad_sigma():
    volume = np.zeros((3, 16, 16), np.float32)
    volume[1, 8, 8] = 1.0
    out = baseline.gaussian_filter(volume, 1.5)
    assert out[0].max() == 0 and out[2].max() == 0  # in-plane only
    assert out[1].sum() == pytest.approx(1.0, rel=1e-5)  # far from edges: mass is kept
    with pytest.raises(ValueError, match="sigma"):
        baseline.gaussian_kernel(-1.0)
    with pytest.raises(ValueError, match="too small"):
        baseline.gaussian_filter(np.zeros((4, 4)), 3.0)


def _phantom(seed=0, r=12):
    """Noisy realisations of a uniform slab with a hot disk, and its ROIs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:40, :40]
    lesion2d = (yy - 20) ** 2 + (xx - 12) ** 2 <= 9
    truth = np.where(lesion2d, 4.0, 1.0)[None].repeat(3, 0)
    images = truth[None] + rng.normal(0, 0.3, size=(r, 3, 40, 40))
    voi = np.zeros_like(truth, bool)
    voi[:, 8:32, 24:36] = True
    lesion = np.zeros_like(voi)
    lesion[:, lesion2d] = True
    return images.astype(np.float32), truth.astype(np.float32), lesion, voi


def test_gain_at_matched_cov_agrees_with_a_brute_force_sigma_search():
    images, truth, lesion, voi = _phantom()

    def metrics(x):
        return {"liver_cov_pct": liver_cov(x, voi), "bias": lesion_bias(x, truth, lesion)}

    gauss = baseline.curve(images, metrics)
    covs = np.asarray(gauss["liver_cov_pct"])
    assert np.all(np.diff(covs) < 0)  # more blur, less noise
    for sigma_true in (0.3, 0.6, 1.1, 2.2, 3.7, 4.7):  # between the grid's sigmas
        filtered = baseline.gaussian_filter(images, sigma_true)
        cov = liver_cov(filtered, voi)
        # brute force: search the sigma of that CoV, measure the bias there
        sigma = baseline.matched_sigma(images, lambda x: liver_cov(x, voi), cov)
        assert sigma == pytest.approx(sigma_true, abs=2e-3)
        brute = lesion_bias(baseline.gaussian_filter(images, sigma), truth, lesion)
        interpolated = baseline.at_cov(gauss, "bias", cov)
        assert interpolated == pytest.approx(brute, abs=0.1)  # percentage points
        # a "network" that IS that Gaussian gains nothing; one with 5 points more bias-free
        # signal at the same noise gains 5
        assert baseline.gain(gauss, "bias", brute, cov) == pytest.approx(0.0, abs=0.1)
        assert baseline.gain(gauss, "bias", brute + 5, cov) == pytest.approx(5.0, abs=0.1)


def test_off_the_curve_has_no_gain():
    gauss = {"liver_cov_pct": [10.0, 5.0, 2.0], "bias": [0.0, -10.0, -30.0]}
    assert np.isnan(baseline.gain(gauss, "bias", -1.0, 12.0))  # noisier than the input
    assert np.isnan(baseline.gain(gauss, "bias", -1.0, 1.0))  # smoother than the widest
    assert np.isnan(baseline.gain(gauss, "bias", -1.0, float("nan")))
    assert baseline.at_cov(gauss, "bias", 2.0) == pytest.approx(-30.0)  # the ends and the
    assert baseline.at_cov(gauss, "bias", 5.0) == pytest.approx(-10.0)  # points are on it
    between = baseline.at_cov(gauss, "bias", 7.5)
    assert -10.0 < between < 0.0  # monotone between its neighbours (no overshoot)
