r"""Speed of our OSEM against a reference OSEM built on scikit-image's radon/iradon.

Both reconstruct the same simulated slices (128 x 128, 4 mm; 120 views x 128 bins) with the
same algorithm: attenuation/normalisation in the multiplicative term, scatter + randoms
additive, no PSF model, interleaved subsets. Timed after one warm-up call each, in one run,
on the same machine; prints slices/second for both and the ratio.

    pip install -e '.[bench]'
    python benchmarks/osem_vs_skimage.py --slices 16 --iterations 3 --subsets 12
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from skimage.transform import iradon, radon

from tgd_jax.sim import acquisition
from tgd_jax.sim.phantom import make_phantom
from tgd_jax.sim.projector import system_matrix
from tgd_jax.sim.recon import ReconSettings, osem
from tgd_jax.sim.study import SimConfig, project_phantom, sensitivity, simulation_key


def reference_osem(counts, mult, add, angles_deg, iterations, subsets, n, pixel_mm):
    """Numpy/scikit-image OSEM, one slice at a time (radon is per image, in pixel units)."""
    images = []
    for y, m, a in zip(counts, mult, add, strict=True):
        x = np.ones((n, n))
        sens = [iradon((m[s::subsets]).T, theta=angles_deg[s::subsets], filter_name=None,
                       output_size=n, circle=False) for s in range(subsets)]
        for _ in range(iterations):
            for s in range(subsets):
                views = slice(s, None, subsets)
                proj = pixel_mm * radon(x, theta=angles_deg[views], circle=False).T
                pad = (proj.shape[1] - m.shape[1]) // 2
                proj = proj[:, pad:pad + m.shape[1]]
                ybar = m[views] * proj + a[views]
                ratio = np.where(ybar > 0, y[views] / np.maximum(ybar, 1e-12), 0.0)
                full = np.zeros((ratio.shape[0], proj.shape[1] + 2 * pad))
                full[:, pad:pad + m.shape[1]] = m[views] * ratio
                back = iradon(full.T, theta=angles_deg[views], filter_name=None,
                              output_size=n, circle=False)
                sens_s = sens[s]
                x = np.where(sens_s > 1e-9 * sens_s.max(), x * back / np.maximum(sens_s, 1e-12), 0)
        images.append(x)
    return np.stack(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--subsets", type=int, default=12)
    args = parser.parse_args()

    config = SimConfig(n_slices=args.slices)
    phantom = make_phantom(simulation_key(0), config.fine_grid, bmi="low", n_lesions=1)
    emission, mu = project_phantom(phantom, config)
    rates = acquisition.expected_rates(emission, mu, sensitivity=sensitivity(config),
                                       geometry=config.geometry, scanner=config.scanner)
    seconds = 120.0
    counts = np.asarray(acquisition.poisson(simulation_key(1), seconds * rates.prompts),
                        np.float32)
    mult = seconds * rates.multiplicative
    add = seconds * (rates.scatter + rates.randoms)
    settings = ReconSettings(args.iterations, args.subsets, 0.0, 0.0, 0.0, 1.0)
    system = system_matrix(config.recon_n, config.recon_pixel_mm, config.geometry, args.subsets)
    angles = np.degrees(config.geometry.angles())
    # skimage's detector spacing is one pixel: our bins (4 mm) equal the pixel (4 mm).
    assert config.geometry.bin_mm == config.recon_pixel_mm

    osem(counts, mult, add, system, settings)  # warm-up (compile)
    t0 = time.perf_counter()
    ours = osem(counts, mult, add, system, settings)
    ours_s = time.perf_counter() - t0

    px = config.recon_pixel_mm
    reference_osem(counts[:1], mult[:1], add[:1], angles, 1, args.subsets, config.recon_n, px)
    t0 = time.perf_counter()
    ref = reference_osem(counts, mult, add, angles, args.iterations, args.subsets,
                         config.recon_n, px)
    ref_s = time.perf_counter() - t0

    liver = np.asarray(phantom.rois["liver_voi"]).reshape(
        args.slices, config.recon_n, 2, config.recon_n, 2).mean((2, 4)) >= 0.5
    print(f"device: {jax.devices()[0]}")
    print(f"slices: {args.slices}, {args.iterations} iterations x {args.subsets} subsets")
    print(f"ours (JAX, sparse matched projector): {args.slices / ours_s:8.2f} slices/s")
    print(f"reference (scikit-image radon/iradon): {args.slices / ref_s:8.2f} slices/s")
    print(f"speed-up: {ref_s / ours_s:.1f}x")
    print(f"liver mean, ours {ours[liver].mean():.3f}, reference {ref[liver].mean():.3f} "
          f"(truth {phantom.activity[np.asarray(phantom.rois['liver_voi'])].mean():.3f})")


if __name__ == "__main__":
    main()
