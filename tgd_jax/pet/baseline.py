"""The field's plain baseline: a Gaussian post-filter of the same input, at matched noise.

A denoiser is worth something only if, at the SAME liver noise, it keeps more lesion than a
Gaussian filter of its input. This module filters the short-scan realisations in-plane with
a grid of Gaussians (:data:`SIGMAS_PX`), measures each filter's liver CoV and lesion
metrics (the *Gaussian curve*), and places a network on that curve:

    gain = metric(network) - curve(metric) interpolated at the network's liver CoV

for the lesion ensemble bias (% of the 600 s reference; higher, i.e. closer to 0 from
below, is better) and the contrast recovery (% of the true contrast). A positive gain means
the network keeps more lesion than a blur of the same noise. The curve is interpolated with
a monotone cubic (PCHIP) in log CoV between its sigmas (within 0.1 points of a brute-force
sigma search in the tests, where linear interpolation in CoV errs by up to 0.6); a network
noisier than the unfiltered input or smoother than the widest filter lies off the curve
and gets no gain (NaN).

The filter is 2D (in-plane, per slice), as clinical post-filters of 2D-reconstructed slices
are and as the 2.5D networks see the slices; the z direction is left unfiltered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from tgd_jax.errors import UsageError

__all__ = ["SIGMAS_PX", "gaussian_kernel", "gaussian_filter", "curve", "at_cov", "gain",
           "matched_sigma"]

#: In-plane sigmas (pixels) of the Gaussian curve: 0 (the input itself) to 5 px (20 mm at
#: 4 mm pixels, FWHM 47 mm), finer where the curve bends.
SIGMAS_PX: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0,
                                3.5, 4.0, 4.5, 5.0)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The normalised 1D Gaussian of ``sigma`` pixels, truncated at 4 sigma; ``[1]`` for 0."""
    if not (np.isfinite(sigma) and sigma >= 0):
        raise UsageError(f"sigma must be finite and >= 0 pixels, got {sigma}")
    if sigma == 0:
        return np.ones(1, np.float64)
    half = max(1, int(np.ceil(4 * sigma)))
    x = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_filter(images: np.ndarray, sigma: float) -> np.ndarray:
    """In-plane Gaussian filter of ``(..., H, W)`` images (reflecting edges), float32.

    Separable: the kernel of :func:`gaussian_kernel` along W, then along H; slices are
    independent. (scipy's ``correlate1d`` runs the convolution; its ``reflect`` mode
    repeats the edge pixel, as ``numpy.pad(mode="symmetric")`` does.)
    """
    from scipy import ndimage

    k = gaussian_kernel(sigma)
    out = np.asarray(images, np.float32)
    if k.size == 1:
        return out.copy()
    for axis in (-1, -2):
        if out.shape[axis] <= k.size // 2:
            raise UsageError(f"an image of {out.shape[axis]} pixels along axis {axis} is too "
                             f"small for sigma {sigma} (the kernel needs {k.size // 2 + 1})")
        out = ndimage.correlate1d(out, k.astype(np.float32), axis=axis, mode="reflect")
    return out


Metrics = Callable[[np.ndarray], Mapping[str, float]]


def curve(realisations: np.ndarray, metrics: Metrics,
          sigmas: Sequence[float] = SIGMAS_PX) -> dict[str, list[float]]:
    """The Gaussian curve: ``metrics`` of the filtered ``(R, Z, H, W)`` realisations per sigma.

    ``metrics(images)`` returns named values, one of which must be ``liver_cov_pct``.
    Returns ``{"sigma_px": [...], "<metric>": [...], ...}``, one entry per sigma.
    """
    out: dict[str, list[float]] = {"sigma_px": [float(s) for s in sigmas]}
    for sigma in sigmas:
        for name, value in metrics(gaussian_filter(realisations, sigma)).items():
            out.setdefault(name, []).append(float(value))
    if "liver_cov_pct" not in out:
        raise UsageError("the metrics must include 'liver_cov_pct' (the curve's abscissa)")
    return out


def at_cov(gauss: Mapping[str, Sequence[float]], metric: str, cov: float) -> float:
    """The curve's ``metric`` at liver CoV ``cov`` (PCHIP in log CoV); NaN off the curve.

    Points are taken in order of CoV (the CoV falls as sigma grows); of points with equal
    CoV the first is kept.
    """
    from scipy.interpolate import PchipInterpolator

    covs = np.asarray(gauss["liver_cov_pct"], np.float64)
    values = np.asarray(gauss[metric], np.float64)
    if not np.isfinite(cov) or cov < covs.min() or cov > covs.max() or covs.min() <= 0:
        return float("nan")
    covs, first = np.unique(covs, return_index=True)  # sorted, one point per CoV
    if covs.size == 1:
        return float(values[first[0]])
    return float(PchipInterpolator(np.log(covs), values[first])(np.log(cov)))


def gain(gauss: Mapping[str, Sequence[float]], metric: str, value: float, cov: float) -> float:
    """``value`` minus the curve's ``metric`` at the same liver CoV (NaN off the curve)."""
    return float(value - at_cov(gauss, metric, cov))


def matched_sigma(realisations: np.ndarray, cov_of: Callable[[np.ndarray], float],
                  cov: float, *, hi: float = SIGMAS_PX[-1], tol: float = 1e-4) -> float:
    """The sigma (px) whose filtered realisations have liver CoV ``cov``, by bisection.

    The brute-force counterpart of :func:`at_cov` (a filter per step); NaN off the curve.
    """
    lo_cov, hi_cov = cov_of(gaussian_filter(realisations, 0.0)), \
        cov_of(gaussian_filter(realisations, hi))
    if not hi_cov <= cov <= lo_cov:
        return float("nan")
    lo, top = 0.0, hi
    while top - lo > tol:
        mid = 0.5 * (lo + top)
        if cov_of(gaussian_filter(realisations, mid)) > cov:
            lo = mid
        else:
            top = mid
    return 0.5 * (lo + top)
