"""The paper's test metrics on a ``test`` dataset: lesion ensemble bias and liver CoV.

For each network (and the un-denoised input) every 60 s realisation ``r`` of a study is
denoised, then (supplement of Chen et al. 2021):

* ensemble bias (%) = mean_r (mu_r^L - T_L) / T_L * 100, with mu_r^L the mean in lesion L
  and T_L the lesion's mean in the study's 600 s reference image of the same version;
* liver CoV (%) = mean_{j in B} sigma_j / mean_B * 100, sigma_j the standard deviation of
  voxel j across realisations, B the 3D liver VOI, mean_B the mean over B and realisations.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tgd_jax.pet.denoise import denoise_volume
from tgd_jax.pet.models import network_of
from tgd_jax.train import checkpoints, readers
from tgd_jax.train.dataset import DatasetError, open_dataset
from tgd_jax.train.errors import UsageError

__all__ = ["lesion_bias", "liver_cov", "contrast_recovery", "body_psnr", "body_ssim",
           "SSIM_WINDOW", "evaluate", "table", "figure"]

#: dm-pix's default SSIM window (and scikit-image's with ``gaussian_weights=True``).
SSIM_WINDOW = 11


def lesion_bias(realisations: np.ndarray, reference: np.ndarray, lesion: np.ndarray) -> float:
    """Ensemble bias (%) of ``(R, Z, H, W)`` images in a boolean lesion mask."""
    _check_roi(lesion, "lesion")
    target = float(reference[lesion].mean())
    if not np.isfinite(target) or target == 0:
        raise UsageError(f"the reference's mean in the lesion is {target}; the bias is "
                         "relative to it and needs a finite, non-zero value")
    means = realisations[:, lesion].mean(axis=1)
    return float(np.mean((means - target) / target) * 100)


def liver_cov(realisations: np.ndarray, voi: np.ndarray) -> float:
    """Mean voxel-wise standard deviation across realisations over the VOI mean (%)."""
    _check_roi(voi, "liver VOI")
    if realisations.shape[0] < 2:
        raise UsageError(f"liver CoV needs at least 2 realisations, got {realisations.shape[0]}")
    values = realisations[:, voi]  # (R, N)
    return float(values.std(axis=0, ddof=1).mean() / values.mean() * 100)


def contrast_recovery(realisations: np.ndarray, truth: np.ndarray, lesion: np.ndarray,
                      background: np.ndarray) -> float:
    """Lesion-to-background contrast of ``(R, Z, H, W)`` images over the true one (%)."""
    _check_roi(lesion, "lesion")
    _check_roi(background, "background")
    t_l, t_b = float(truth[lesion].mean()), float(truth[background].mean())
    if not (np.isfinite(t_l) and np.isfinite(t_b)) or t_b <= 0 or t_l == t_b:
        raise UsageError(f"true lesion mean {t_l} and background mean {t_b}: contrast "
                         "recovery needs a positive background and a non-zero true contrast")
    ratios = realisations[:, lesion].mean(axis=1) / realisations[:, background].mean(axis=1)
    return float(np.mean(ratios - 1) / (t_l / t_b - 1) * 100)


def _data_range(reference: np.ndarray, body: np.ndarray) -> float:
    _check_roi(body, "body")
    top = float(reference[body].max())
    if not np.isfinite(top) or top <= 0:
        raise UsageError(f"the reference's maximum in the body is {top}; PSNR and SSIM need "
                         "a positive data range")
    return top


def body_psnr(images: np.ndarray, reference: np.ndarray, body: np.ndarray) -> float:
    """Mean PSNR (dB) of ``(R, Z, H, W)`` images against ``(Z, H, W)`` over body voxels."""
    import dm_pix

    top = _data_range(reference, body)
    a = images[:, body][:, :, None, None] / top  # (R, N, 1, 1): dm-pix reduces H, W, C
    b = np.broadcast_to(reference[body][None, :, None, None] / top, a.shape)
    return float(np.mean(dm_pix.psnr(a, b)))


def body_ssim(images: np.ndarray, reference: np.ndarray, body: np.ndarray) -> float:
    """Mean SSIM of ``(R, Z, H, W)`` images against ``(Z, H, W)``, over body pixels.

    The SSIM map is computed per slice (``dm_pix.ssim(..., return_map=True)``, valid
    windows only, so the map lacks a ``SSIM_WINDOW // 2`` border) and averaged over the body
    pixels it covers.
    """
    import dm_pix

    top = _data_range(reference, body)
    pad = SSIM_WINDOW // 2
    inner = body[:, pad:-pad, pad:-pad]
    _check_roi(inner, f"body (more than {pad} pixels from the edge)")
    values = []
    for image in images:  # one realisation at a time keeps memory at one volume
        ssim_map = dm_pix.ssim(image[..., None], reference[..., None], max_val=top,
                               filter_size=SSIM_WINDOW, return_map=True)[..., 0]
        values.append(float(np.asarray(ssim_map)[inner].mean()))
    return float(np.mean(values))


def _check_roi(mask: np.ndarray, name: str) -> None:
    if not np.any(mask):
        raise UsageError(f"the {name} ROI is empty: no voxel to measure")


def evaluate(test_path: str | Path, networks: Mapping[str, str | Path], *,
             version: str = "v2", which: str = "best") -> dict[str, Any]:
    """Metrics of the input and of each named checkpoint on every study of ``test_path``.

    Returns ``{"rows": [row, ...], "examples": {"<network>/<study>": (H, W) slice through
    the first lesion, first realisation}}``; each row has ``network``, ``study``,
    ``bmi_class``, ``lesion_bias_pct``, ``liver_cov_pct``, ``lesion_bias_truth_pct``,
    ``contrast_recovery_pct``, ``psnr_db``, ``ssim`` and ``checkpoint``.
    """
    if "input" in networks:
        raise UsageError("a network may not be named 'input': that row is the un-denoised "
                         "input")
    info = open_dataset(test_path)
    if info.role != "test" or version not in info.versions:
        raise DatasetError(f"{test_path}: need a 'test' dataset with version '{version}' "
                           f"(role '{info.role}', versions {list(info.versions)})")
    loaded = {}
    for name, path in networks.items():
        params, stats, config, meta = checkpoints.restore(path, which)
        model, scale = network_of(config, meta["checkpoint"])
        loaded[name] = (model, {"params": params, "batch_stats": stats}, scale,
                        meta["checkpoint"])
    rows: list[dict[str, Any]] = []
    examples: dict[str, np.ndarray] = {}
    with h5py.File(test_path, "r") as f:
        for study in info.studies:
            g = f[study]
            lesions = sorted(k for k in g["rois"] if k.startswith("lesion"))
            if not lesions:
                raise DatasetError(f"{test_path}: study '{study}' has no lesion ROI")
            lesion, voi, body = (_read(g, f"rois/{k}", test_path).astype(bool)
                                 for k in (lesions[0], "liver_voi", "body"))
            truth = _read(g, "truth", test_path)
            bmi = json.loads(g.attrs.get("attrs", "{}")).get("bmi_class", "")
            for roi, mask in ((lesions[0], lesion), ("liver_voi", voi), ("body", body)):
                if not mask.any():
                    raise DatasetError(f"{test_path}: study '{study}': ROI '{roi}' is empty")
            reference = _read(g, f"{version}/target", test_path)
            noisy = _read(g, f"{version}/realisations", test_path)
            z = int(np.argmax(lesion.sum(axis=(1, 2))))
            for name, images in _outputs(noisy, loaded):
                rows.append({"network": name, "study": study, "bmi_class": bmi,
                             "lesion_bias_pct": lesion_bias(images, reference, lesion),
                             "liver_cov_pct": liver_cov(images, voi),
                             "lesion_bias_truth_pct": lesion_bias(images, truth, lesion),
                             "contrast_recovery_pct": contrast_recovery(images, truth, lesion,
                                                                        voi),
                             "psnr_db": body_psnr(images, reference, body),
                             "ssim": body_ssim(images, reference, body),
                             "checkpoint": loaded[name][3] if name in loaded else None})
                examples[f"{name}/{study}"] = images[0, z]
    return {"rows": rows, "examples": examples, "version": version, "test": str(test_path)}


def _read(g: h5py.Group, key: str, path: str | Path) -> np.ndarray:
    """An array open_dataset validated; a failing read (truncated chunk) names it."""
    where = f"{path}: study '{g.name.strip('/')}': key '{key}'"
    return readers.read_array(g[key], where, error=DatasetError)


def _outputs(noisy: np.ndarray, loaded: Mapping[str, Any]):
    yield "input", noisy
    for name, (model, variables, scale, _) in loaded.items():
        yield name, np.stack([denoise_volume(model, variables, r, scale=scale) for r in noisy])


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of the rows."""
    lines = ["| network | study | BMI | lesion bias % | liver CoV % | bias vs truth % | "
             "contrast recovery % | PSNR dB | SSIM |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['network']} | {r['study']} | {r.get('bmi_class', '')} | "
              f"{r['lesion_bias_pct']:.2f} | {r['liver_cov_pct']:.2f} | "
              f"{r['lesion_bias_truth_pct']:.2f} | {r['contrast_recovery_pct']:.1f} | "
              f"{r['psnr_db']:.2f} | {r['ssim']:.4f} |" for r in rows]
    return "\n".join(lines)


def figure(examples: Mapping[str, np.ndarray], path: str | Path, *,
           make_parent: bool = True) -> None:
    """One realisation's slice through the lesion, per network (and study)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tgd_jax.train.workdir import save_figure

    names = list(examples)
    vmax = float(np.percentile(examples[names[0]], 99.5))
    fig, axes = plt.subplots(1, len(names), figsize=(2.8 * len(names), 3))
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        ax.imshow(examples[name], cmap="gray_r", vmin=0, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    save_figure(fig, path, make_parent=make_parent)
