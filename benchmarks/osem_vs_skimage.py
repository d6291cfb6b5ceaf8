r"""Speed of our OSEM against a reference OSEM built on scikit-image's radon/iradon.

Both reconstruct the same simulated slices (128 x 128, 4 mm; 120 views x 128 bins) with the
same algorithm: attenuation/normalisation in the multiplicative term, scatter + randoms
additive, no PSF model, interleaved subsets. Timed after one warm-up call each, in one run,
on the same machine; prints slices/second for both and the ratio.

    pip install -e '.[bench]'
    python -m benchmarks.osem_vs_skimage --slices 16 --iterations 3 --subsets 12
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from skimage.transform import iradon, radon

from benchmarks.timing import time_rounds
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


def measure(slices: int = 16, iterations: int = 3, subsets: int = 12,
            rounds: int = 3) -> dict[str, float]:
    """Slices/s of our OSEM and of the scikit-image reference, measured in one run."""
    config = SimConfig(n_slices=slices)
    phantom = make_phantom(simulation_key(0), config.fine_grid, bmi="low", n_lesions=1)
    emission, mu = project_phantom(phantom, config)
    rates = acquisition.expected_rates(emission, mu, sensitivity=sensitivity(config),
                                       geometry=config.geometry, scanner=config.scanner)
    seconds = 120.0
    counts = np.asarray(acquisition.poisson(simulation_key(1), seconds * rates.prompts),
                        np.float32)
    mult = seconds * rates.multiplicative
    add = seconds * (rates.scatter + rates.randoms)
    settings = ReconSettings(iterations, subsets, 0.0, 0.0, 0.0, 1.0)
    system = system_matrix(config.recon_n, config.recon_pixel_mm, config.geometry, subsets)
    angles = np.degrees(config.geometry.angles())
    # skimage's detector spacing is one pixel: our bins (4 mm) equal the pixel (4 mm).
    assert config.geometry.bin_mm == config.recon_pixel_mm
    px = config.recon_pixel_mm
    out: dict[str, object] = {}

    def ours() -> None:
        out["ours"] = np.asarray(osem(counts, mult, add, system, settings))

    def ref() -> None:
        out["ref"] = reference_osem(counts, mult, add, angles, iterations, subsets,
                                    config.recon_n, px)

    t_ours = time_rounds(ours, rounds=rounds, warmup=1)
    t_ref = time_rounds(ref, rounds=max(1, rounds - 1), warmup=0)
    liver = np.asarray(phantom.rois["liver_voi"]).reshape(
        slices, config.recon_n, 2, config.recon_n, 2).mean((2, 4)) >= 0.5
    return {"slices": slices, "iterations": iterations, "subsets": subsets,
            "ours_slices_per_s": slices / t_ours["min_s"],
            "skimage_slices_per_s": slices / t_ref["min_s"],
            "ratio": t_ref["min_s"] / t_ours["min_s"],
            "liver_mean_ours": float(out["ours"][liver].mean()),
            "liver_mean_skimage": float(out["ref"][liver].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--subsets", type=int, default=12)
    args = parser.parse_args()
    result = measure(args.slices, args.iterations, args.subsets)
    print(f"device: {jax.devices()[0]}")
    print(f"slices: {args.slices}, {args.iterations} iterations x {args.subsets} subsets")
    print(f"ours (JAX, sparse matched projector): {result['ours_slices_per_s']:8.2f} slices/s")
    print(f"reference (scikit-image radon/iradon): {result['skimage_slices_per_s']:8.2f} "
          "slices/s")
    print(f"speed-up: {result['ratio']:.1f}x")
    print(f"liver mean, ours {result['liver_mean_ours']:.3f}, reference "
          f"{result['liver_mean_skimage']:.3f}")


if __name__ == "__main__":
    main()
