"""One simulated study, end to end: phantom -> expected data -> counts -> OSEM images.

:class:`SimConfig` fixes the geometry (fine truth grid, 4 mm reconstruction grid, sinogram)
and the physics; :func:`simulate_study` runs the pipeline for one study and returns what a
dataset stores. Everything random derives from the study's key.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tgd_jax.errors import UsageError
from tgd_jax.sim import acquisition
from tgd_jax.sim.cache import disk_cached
from tgd_jax.sim.phantom import Grid, Phantom, make_phantom
from tgd_jax.sim.projector import SinogramGeometry, line_integrals, system_matrix
from tgd_jax.sim.recon import VERSIONS, ReconSettings, osem

__all__ = ["SimConfig", "Study", "simulate_study", "simulation_key", "sensitivity", "downsample",
           "project_phantom", "reconstruct"]

#: Reference acquisition of the count calibration.
REFERENCE_SECONDS, REFERENCE_TRUES = 120.0, 1.0e6
TARGET_SECONDS = 600.0


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """Geometry and physics shared by every study of a dataset."""

    n_slices: int = 16
    recon_n: int = 128
    recon_pixel_mm: float = 4.0
    slice_mm: float = 4.0
    oversample: int = 2  # truth grid = recon grid / oversample (2 mm)
    geometry: SinogramGeometry = SinogramGeometry()
    scanner: acquisition.ScannerModel = acquisition.ScannerModel()

    @property
    def fine_grid(self) -> Grid:
        return Grid(self.recon_n * self.oversample, self.recon_pixel_mm / self.oversample,
                    self.n_slices, self.slice_mm)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Study:
    """What one study contributes to a dataset (images on the reconstruction grid)."""

    truth: np.ndarray  # (Z, n, n) SUV, truth averaged onto the reconstruction grid
    rois: dict[str, np.ndarray]  # name -> (Z, n, n) bool
    images: dict[str, np.ndarray]  # "v2/target", "v2/inputs/030", "v1/halves/a", ...
    attrs: dict[str, Any]


def simulation_key(seed: int) -> jax.Array:
    """The simulator's PRNG key for a seed: always threefry, whatever JAX's default PRNG
    is, so a seed gives the same dataset everywhere (and Poisson sampling needs threefry)."""
    return jax.random.key(seed, impl="threefry2x32")


def downsample(fine: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor x factor`` blocks: ``(Z, n*f, n*f) -> (Z, n, n)``."""
    z, n = fine.shape[0], fine.shape[1] // factor
    return fine.reshape(z, n, factor, n, factor).mean(axis=(2, 4))


def project_phantom(phantom: Phantom, config: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    """Fine-grid data model: line integrals of ``G x`` (4.5 mm blur) and of ``mu``."""
    grid = config.fine_grid
    blurred = acquisition.gaussian_blur(
        jnp.asarray(phantom.activity), grid.pixel_mm, config.scanner.resolution_fwhm_mm)
    kwargs = dict(pixel_mm=grid.pixel_mm, geometry=config.geometry)
    return (np.asarray(line_integrals(blurred, **kwargs)),
            np.asarray(line_integrals(jnp.asarray(phantom.mu), **kwargs)))


def sensitivity(config: SimConfig) -> float:
    """K such that a reference low-BMI study has ~1e6 trues per slice at 120 s/bed."""
    # The calibration uses a fixed 4-slice reference: cache it independently of n_slices.
    return _sensitivity(dataclasses.replace(config, n_slices=4))


@functools.lru_cache(maxsize=4)
def _sensitivity(config: SimConfig) -> float:
    (per_slice,) = _reference_trues(config)
    return REFERENCE_TRUES / (REFERENCE_SECONDS * float(per_slice))


@disk_cached("reference-trues", device=True)
def _reference_trues(config: SimConfig) -> tuple[np.ndarray]:
    """Mean expected trues per slice of the reference study at unit sensitivity, per second."""
    reference = make_phantom(simulation_key(0), config.fine_grid, bmi="low", n_lesions=0)
    emission, mu = project_phantom(reference, config)
    unit = acquisition.expected_rates(emission, mu, sensitivity=1.0, geometry=config.geometry,
                                      scanner=config.scanner)
    return (np.float64(float(unit.trues.sum((1, 2)).mean())),)


def reconstruct(counts: Any, seconds: float, expected: acquisition.ExpectedData,
                settings: ReconSettings, config: SimConfig) -> np.ndarray:
    """OSEM of counts acquired over ``seconds``, with the version's model of the data."""
    system = system_matrix(config.recon_n, config.recon_pixel_mm, config.geometry,
                           settings.subsets)
    additive = seconds * (settings.scatter_scale * expected.scatter + expected.randoms)
    return osem(counts, seconds * expected.multiplicative, additive, system, settings,
                slice_mm=config.slice_mm)


def simulate_study(
    key: jax.Array,
    config: SimConfig,
    *,
    bmi: str = "low",
    versions: Sequence[str] = ("v1", "v2"),
    levels: Sequence[float] = (),
    target: bool = True,
    halves_seconds: float | None = None,
    realisations: int = 0,
    realisation_seconds: float = 60.0,
    noiseless: bool = False,
    ood: bool = False,
    liver_lesion: bool = False,
    n_lesions: int | None = None,
    recipe: str = "sparse",
    lesion_set: str = "single",
) -> Study:
    """Simulates one study.

    Args:
      key: the study's PRNG key (threefry: see :func:`simulation_key`).
      config: geometry and physics.
      bmi: "low" or "high".
      versions: reconstruction versions to produce ("v1", "v2").
      levels: input count levels in s/bed, thinned from the 600 s acquisition.
      target: reconstruct the 600 s/bed acquisition (the training target / reference).
      halves_seconds: if set, thin to this duration and split into two noise-2-noise halves
        (stored as ``halves/full``, ``halves/a``, ``halves/b``).
      realisations: number of disjoint, i.i.d. pieces of ``realisation_seconds`` each, cut
        from the 600 s acquisition (needs ``realisations * realisation_seconds <= 600``).
      noiseless: also reconstruct the expected 600 s data (no noise).
      ood, liver_lesion, n_lesions, recipe, lesion_set: phantom options (see :func:`make_phantom`).
    """
    for version in versions:
        if version not in VERSIONS:
            raise UsageError(f"unknown reconstruction version {version!r}; have {list(VERSIONS)}")
    if realisations * realisation_seconds > TARGET_SECONDS + 1e-9:
        raise UsageError(f"{realisations} x {realisation_seconds} s exceed the 600 s acquisition")
    k_phantom, k_counts, k_levels, k_halves, k_real = jax.random.split(key, 5)
    phantom = make_phantom(k_phantom, config.fine_grid, bmi=bmi, ood=ood,
                           liver_lesion=liver_lesion, n_lesions=n_lesions, recipe=recipe,
                           lesion_set=lesion_set)
    emission, mu = project_phantom(phantom, config)
    rates = acquisition.expected_rates(emission, mu, sensitivity=sensitivity(config),
                                       geometry=config.geometry, scanner=config.scanner)
    full = acquisition.poisson(k_counts, jnp.asarray(TARGET_SECONDS * rates.prompts))

    acquisitions: dict[str, tuple[Any, float]] = {}
    if target:
        acquisitions["target"] = (full, TARGET_SECONDS)
    if noiseless:
        acquisitions["noiseless"] = (TARGET_SECONDS * rates.prompts, TARGET_SECONDS)
    for i, seconds in enumerate(levels):
        thinned = acquisition.thin(jax.random.fold_in(k_levels, i), full, seconds / TARGET_SECONDS)
        acquisitions[f"inputs/{int(round(seconds)):03d}"] = (thinned, float(seconds))
    if halves_seconds is not None:
        k_short, k_split = jax.random.split(k_halves)
        short = acquisition.thin(k_short, full, halves_seconds / TARGET_SECONDS)
        a, b = acquisition.split_halves(k_split, short)
        acquisitions["halves/full"] = (short, halves_seconds)
        acquisitions["halves/a"] = (a, halves_seconds / 2)
        acquisitions["halves/b"] = (b, halves_seconds / 2)
    pieces = None
    if realisations:
        k_pool, k_split = jax.random.split(k_real)  # one key, one use
        pool = acquisition.thin(k_pool, full, realisations * realisation_seconds / TARGET_SECONDS)
        pieces = acquisition.split_realisations(k_split, pool, realisations)

    images: dict[str, np.ndarray] = {}
    for version in versions:
        settings = VERSIONS[version]
        for name, (counts, seconds) in acquisitions.items():
            images[f"{version}/{name}"] = reconstruct(counts, seconds, rates, settings, config)
        if pieces is not None:
            images[f"{version}/realisations"] = np.stack([
                reconstruct(p, realisation_seconds, rates, settings, config) for p in pieces])

    f = config.oversample
    rois = {name: downsample(mask.astype(np.float32), f) >= 0.5
            for name, mask in phantom.rois.items()}
    trues_120 = float(REFERENCE_SECONDS * rates.trues.sum((1, 2)).mean())
    attrs = {
        **{k: v for k, v in phantom.attrs.items() if k != "lesions"},
        "lesions": phantom.attrs["lesions"],
        "trues_per_slice_120s": trues_120,
        "counts_600s_per_slice": float(np.asarray(full).sum((1, 2)).mean()),
    }
    return Study(truth=downsample(phantom.activity, f).astype(np.float32), rois=rois,
                 images=images, attrs=attrs)
