r"""Is a finer reconstruction grid worth its cost? 4 mm (the simulator's) against 2.67 mm.

  python experiments/recon_grid.py --out=runs/recon_grid

Simulates the same test studies (an 8-10 mm liver lesion, noiseless reconstruction, the
600 s target) on the 128 x 128 x 4 mm grid and on a 192 x 192 x 2.67 mm grid with a matching
sinogram (192 bins of 2.67 mm, 240 views: twice the 4 mm grid's 120, and divisible by
both versions' subsets), and reports per grid: the simulator's seconds per
study, the small-lesion recovery and aspect ratio of each version (properties 2-3 of
docs/simulator.md), and the pixels per slice the networks would have to process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

_OUT = flags.DEFINE_string("out", "runs/recon_grid", "Output folder.")
_STUDIES = flags.DEFINE_integer("studies", 3, "Test studies per grid.")
_SLICES = flags.DEFINE_integer("slices", 8, "Slices per study.")


def measure(studies: int, slices: int) -> dict:
    import jax

    from tgd_jax.sim import report
    from tgd_jax.sim.projector import SinogramGeometry
    from tgd_jax.sim.study import SimConfig, simulate_study, simulation_key

    grids = {"4 mm": SimConfig(n_slices=slices),
             "2.67 mm": SimConfig(n_slices=slices, recon_n=192, recon_pixel_mm=512 / 192,
                                  geometry=SinogramGeometry(n_bins=192, bin_mm=512 / 192,
                                                            n_views=240))}
    out = {}
    for name, config in grids.items():
        rows = []
        for i in range(studies):
            key = jax.random.fold_in(simulation_key(0), 1000 + i)
            t0 = time.perf_counter()
            study = simulate_study(key, config, noiseless=True, liver_lesion=True)
            seconds = time.perf_counter() - t0
            lesion = study.rois["lesion_0"]
            truth = study.attrs["lesions"][0]["suv"]
            row = {"seconds": seconds}
            for v in ("v1", "v2"):
                image = study.images[f"{v}/noiseless"]
                row[f"{v}_recovery"] = float(image[lesion].mean() / truth)
                row[f"{v}_aspect"] = report.lesion_aspect_ratio(image, lesion,
                                                               config.recon_pixel_mm)
            rows.append(row)
            print(name, i, {k: round(v, 3) for k, v in row.items()}, flush=True)
        out[name] = {"pixels_per_slice": config.recon_n ** 2,
                     **{k: float(np.mean([r[k] for r in rows[1:] or rows])) if k == "seconds"
                        else float(np.mean([r[k] for r in rows])) for k in rows[0]},
                     "rows": rows}
    return out


def main(argv: list[str]) -> None:
    del argv
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    result = measure(_STUDIES.value, _SLICES.value)
    (out / "recon_grid.json").write_text(json.dumps(result, indent=1))
    for name, r in result.items():
        print(f"{name}: {r['seconds']:.1f} s/study (after the first), {r['pixels_per_slice']} "
              f"pixels/slice, recovery v1 {r['v1_recovery']:.3f} v2 {r['v2_recovery']:.3f}, "
              f"aspect v1 {r['v1_aspect']:.2f} v2 {r['v2_aspect']:.2f}")


if __name__ == "__main__":
    app.run(main)
