"""Schema-valid toy datasets in milliseconds, for tests and quick pipeline checks.

Not a simulation: smooth blobs plus Gaussian noise whose level falls with the count level
(sigma ~ 1/sqrt(seconds)); halves and realisations have independent noise around the same
mean. Use :mod:`tgd_jax.sim.generate` for physics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tgd_jax.pet.dataset import write_dataset
from tgd_jax.sim.study import Study

__all__ = ["toy_study", "write_toy_datasets"]


def toy_study(rng: np.random.Generator, shape: tuple[int, int, int], *,
              versions: tuple[str, ...], levels: tuple[float, ...], halves: bool = False,
              realisations: int = 0) -> Study:
    z, h, w = shape
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    truth = np.zeros(shape, np.float32)
    for _ in range(4):
        cy, cx, r, a = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2), \
            rng.uniform(0.5, 3.0)
        truth += (a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))[None]
    truth *= (1 + 0.1 * np.sin(np.arange(z) / 2.0))[:, None, None].astype(np.float32)
    body = (truth > 0.05).astype(bool)
    rois = {"body": body, "liver_voi": truth > np.percentile(truth, 90),
            "lesion_0": truth > np.percentile(truth, 99)}

    def noisy(seconds: float) -> np.ndarray:
        return (truth + rng.normal(0, 1.5 / np.sqrt(seconds), shape)).astype(np.float32)

    images: dict[str, np.ndarray] = {}
    for v in versions:
        images[f"{v}/target"] = noisy(600)
        for s in levels:
            images[f"{v}/inputs/{int(s):03d}"] = noisy(s)
        if halves:
            a, b = noisy(60), noisy(60)
            images.update({f"{v}/halves/a": a, f"{v}/halves/b": b,
                           f"{v}/halves/full": ((a + b) / 2).astype(np.float32)})
        if realisations:
            images[f"{v}/realisations"] = np.stack([noisy(60) for _ in range(realisations)])
    attrs = {"bmi_class": "low", "bmi": 21.0, "trues_per_slice_120s": 1.0}
    return Study(truth, rois, images, attrs)


def write_toy_datasets(folder: str | Path, *, shape: tuple[int, int, int] = (5, 32, 32),
                       seed: int = 0, n_train: int = 3) -> dict[str, Path]:
    """train.h5 (v1, v2; levels 30, 60), finetune.h5 (v2), online.h5 (v2 halves), test.h5."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    out = {}
    recipes = {
        "train": dict(n=n_train, versions=("v1", "v2"), levels=(30.0, 60.0)),
        "finetune": dict(n=2, versions=("v2",), levels=(30.0, 60.0)),
        "test": dict(n=1, versions=("v1", "v2"), levels=(), realisations=3),
        "online": dict(n=1, versions=("v2",), levels=(), halves=True),
    }
    for role, r in recipes.items():
        studies = [toy_study(rng, shape, versions=r["versions"], levels=r["levels"],
                             halves=r.get("halves", False),
                             realisations=r.get("realisations", 0)) for _ in range(r["n"])]
        out[role] = write_dataset(folder / f"{role}.h5", studies, role=role,
                                  versions=r["versions"], levels_s=r["levels"],
                                  sim_config={"toy": True}, recon_settings={}, seed=seed,
                                  realisations=r.get("realisations", 0))
    return out
