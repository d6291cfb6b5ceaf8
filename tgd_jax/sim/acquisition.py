"""PET acquisition: expected data, Poisson counts, exact thinning and splitting.

Expected prompts of a ``t``-second acquisition, per sinogram bin:

    ybar = t * (norm * exp(-P mu) * K * P(G x) + scatter + randoms)

with ``G`` the scanner resolution (4.5 mm FWHM Gaussian), ``P`` the fine-grid line-integral
model, ``norm`` detector normalisation factors ~N(1, 0.1) of one fixed scanner, ``K`` the
sensitivity (counts per second per unit of projected SUV), a smooth scatter background
(scatter fraction 0.35 of trues + scatter) and flat randoms (randoms fraction 0.3 of
prompts). ``K`` is calibrated so that a reference low-BMI study gives about 1e6 true counts
per slice at 120 s/bed.

Lower count levels of the SAME acquisition come from binomial thinning, an exact Poisson
thinning: if ``y ~ Poisson(ybar)`` then ``Binomial(y, f) ~ Poisson(f * ybar)``.
Noise-2-noise halves ``y1 = Binomial(y, 1/2), y2 = y - y1`` are independent Poisson with
equal means (what list-mode rebinning does).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tgd_jax.sim.projector import SinogramGeometry

__all__ = [
    "ScannerModel",
    "ExpectedData",
    "gaussian_blur",
    "gaussian_matrix",
    "normalisation",
    "expected_rates",
    "poisson",
    "thin",
    "split_halves",
    "split_realisations",
]

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclasses.dataclass(frozen=True)
class ScannerModel:
    """The physics of data generation (the truth the reconstruction does not see exactly)."""

    resolution_fwhm_mm: float = 4.5
    scatter_fraction: float = 0.35
    randoms_fraction: float = 0.30
    scatter_kernel_mm: float = 80.0  # FWHM of the scatter blur along the detector
    norm_sigma: float = 0.10
    norm_seed: int = 1234  # one scanner: the same normalisation for every study


@dataclasses.dataclass
class ExpectedData:
    """Per-second expected data of one study: ``(Z, n_views, n_bins)`` each.

    ``multiplicative`` = norm * attenuation factors * K; ``trues = multiplicative * P(Gx)``.
    """

    trues: np.ndarray
    scatter: np.ndarray
    randoms: np.ndarray
    multiplicative: np.ndarray

    @property
    def prompts(self) -> np.ndarray:
        return self.trues + self.scatter + self.randoms


def gaussian_matrix(n: int, pixel_mm: float, fwhm_mm: float) -> np.ndarray:
    """Symmetric ``(n, n)`` 1D Gaussian blur (zero boundary): self-adjoint by construction."""
    if fwhm_mm <= 0:
        return np.eye(n, dtype=np.float32)
    sigma = fwhm_mm * FWHM_TO_SIGMA / pixel_mm
    half = int(np.ceil(4 * sigma))
    total = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2).sum()
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    m = np.where(np.abs(d) <= half, np.exp(-0.5 * (d / sigma) ** 2) / total, 0.0)
    return m.astype(np.float32)


@functools.lru_cache(maxsize=32)
def _blur_matrix(n: int, pixel_mm: float, fwhm: float) -> np.ndarray:
    return gaussian_matrix(n, pixel_mm, fwhm)  # numpy: safe to cache across traces


def gaussian_blur(images: jax.Array, pixel_mm: float, fwhm_x_mm: float,
                  fwhm_y_mm: float | None = None) -> jax.Array:
    """Separable Gaussian blur of ``(B, ny, nx)`` images (rows = y, columns = x).

    Self-adjoint (symmetric matrices), so it can sit on both sides of a matched projector.
    """
    fwhm_y_mm = fwhm_x_mm if fwhm_y_mm is None else fwhm_y_mm
    by = _blur_matrix(images.shape[-2], float(pixel_mm), float(fwhm_y_mm))
    bx = _blur_matrix(images.shape[-1], float(pixel_mm), float(fwhm_x_mm))
    return jnp.einsum("yi,bij,xj->byx", by, images, bx)


@functools.lru_cache(maxsize=8)
def normalisation(geometry: SinogramGeometry, sigma: float = 0.1, seed: int = 1234) -> np.ndarray:
    """Detector normalisation factors ``(n_views, n_bins)`` ~ N(1, sigma), clipped to >= 0.5."""
    rng = np.random.default_rng(seed)
    values = rng.normal(1.0, sigma, (geometry.n_views, geometry.n_bins))
    return np.clip(values, 0.5, None).astype(np.float32)


def expected_rates(
    emission_proj: np.ndarray,
    mu_proj: np.ndarray,
    *,
    sensitivity: float,
    geometry: SinogramGeometry,
    scanner: ScannerModel,
) -> ExpectedData:
    """Expected counts per second from the projections of ``G x`` and ``mu``.

    Args:
      emission_proj: ``(Z, V, B)`` line integrals of the resolution-blurred activity.
      mu_proj: ``(Z, V, B)`` line integrals of the attenuation map.
      sensitivity: K, counts per second per unit of projected SUV.
    """
    norm = normalisation(geometry, scanner.norm_sigma, scanner.norm_seed)
    multiplicative = norm[None] * np.exp(-mu_proj) * sensitivity
    trues = multiplicative * emission_proj
    # Scatter: the attenuated emission smoothed along the detector, scaled to its fraction.
    smooth = np.asarray(gaussian_blur(jnp.asarray(trues), geometry.bin_mm,
                                      scanner.scatter_kernel_mm, 0.0))
    per_view_trues = trues.sum(-1, keepdims=True)
    per_view_smooth = np.maximum(smooth.sum(-1, keepdims=True), 1e-12)
    sf = scanner.scatter_fraction
    scatter = smooth * (per_view_trues / per_view_smooth) * sf / (1 - sf)
    rf = scanner.randoms_fraction
    randoms_total = (trues.sum((1, 2)) + scatter.sum((1, 2))) * rf / (1 - rf)  # (Z,)
    randoms = np.broadcast_to(
        (randoms_total / (geometry.n_views * geometry.n_bins))[:, None, None], trues.shape
    )
    return ExpectedData(trues.astype(np.float32), scatter.astype(np.float32),
                        np.array(randoms, np.float32), multiplicative.astype(np.float32))


@jax.jit
def poisson(key: jax.Array, mean: jax.Array) -> jax.Array:
    """Poisson counts (int32) with the given means."""
    return jax.random.poisson(key, mean).astype(jnp.int32)


@jax.jit
def thin(key: jax.Array, counts: jax.Array, fraction: float | jax.Array) -> jax.Array:
    """``Binomial(counts, fraction)``: the counts of a shorter acquisition (exact)."""
    kept = jax.random.binomial(key, counts.astype(jnp.float32), fraction)
    return jnp.minimum(kept.astype(jnp.int32), counts)


def split_halves(key: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Noise-2-noise halves: ``y1 = Binomial(y, 1/2)``, ``y2 = y - y1`` (sum exactly to y)."""
    first = thin(key, counts, 0.5)
    return first, counts - first


def split_realisations(key: jax.Array, counts: jax.Array, parts: int) -> jax.Array:
    """``parts`` disjoint, i.i.d. pieces of one acquisition (sequential binomial splitting).

    Piece ``i`` takes ``Binomial(remaining, 1 / (parts - i))``: the pieces are independent
    Poisson, each with mean ``ybar / parts``, and sum exactly to ``counts``.
    Returns ``(parts, *counts.shape)`` int32.
    """
    pieces = []
    remaining = counts
    for i, k in enumerate(jax.random.split(key, parts - 1)):
        piece = thin(k, remaining, 1.0 / (parts - i))
        pieces.append(piece)
        remaining = remaining - piece
    pieces.append(remaining)
    return jnp.stack(pieces)
