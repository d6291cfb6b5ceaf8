"""The paper's test metrics on a ``test`` dataset: lesion ensemble bias and liver CoV.

For each network (and the un-denoised input) every 60 s realisation ``r`` of a study is
denoised, then (supplement of Chen et al. 2021):

* ensemble bias (%) = mean_r (mu_r^L - T_L) / T_L * 100, with mu_r^L the mean in lesion L
  and T_L the lesion's mean in the study's 600 s reference image of the same version;
* liver CoV (%) = mean_{j in B} sigma_j / mean_B * 100, sigma_j the standard deviation of
  voxel j across realisations, B the 3D liver VOI, mean_B the mean over B and realisations.

Every lesion ROI of the study is measured (``lesion_0``, the original 8-10 mm liver lesion;
on graded test sets also ``lesion_<organ>_<d>mm`` with its background shell
``bg_<organ>_<d>mm``), and every network is placed against the field's baseline: the
Gaussian post-filter curve of the same realisations (:mod:`tgd_jax.pet.baseline`), as its
*gain* at matched liver CoV, per lesion.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tgd_jax.io import readers
from tgd_jax.io.errors import UsageError
from tgd_jax.pet import baseline
from tgd_jax.pet.dataset import DatasetError, open_dataset
from tgd_jax.pet.denoise import denoise_volume
from tgd_jax.pet.models import network_of
from tgd_jax.train import checkpoints

__all__ = ["lesion_bias", "liver_cov", "contrast_recovery", "body_psnr", "body_ssim",
           "SSIM_WINDOW", "OLD_LESION", "lesion_metrics", "evaluate", "table", "lesion_table",
           "figure", "gain_figure"]

#: The original test lesion (8-10 mm in the liver, 3-5 voxels), kept for the before/after.
OLD_LESION = "lesion_0"

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

    Returns ``{"rows": [row, ...], "gaussian": {study: curve}, "examples":
    {"<network>/<study>": (H, W) slice through the first lesion, first realisation}}``.
    Each row has ``network``, ``study``, ``bmi_class``, ``liver_cov_pct``, ``psnr_db``,
    ``ssim``, ``checkpoint``; for :data:`OLD_LESION` ``lesion_bias_pct``,
    ``lesion_bias_truth_pct``, ``contrast_recovery_pct`` and ``gain_pct`` (bias gain over
    the Gaussian at the row's CoV); the headline lesion's ``headline_lesion``,
    ``headline_bias_pct`` and ``headline_gain_pct`` (:data:`tgd_jax.sim.phantom.
    HEADLINE_LESION` when the study has it, else :data:`OLD_LESION`); and ``lesions``:
    ROI name -> ``{organ, diameter_mm, bias_pct, crc_pct, gain_bias_pct, gain_crc_pct}``.
    A curve (:func:`tgd_jax.pet.baseline.curve`) holds ``sigma_px``, ``liver_cov_pct`` and
    ``<roi>/bias_pct``, ``<roi>/crc_pct`` per sigma.
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
    from tgd_jax.sim.phantom import HEADLINE_LESION

    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[float]]] = {}
    examples: dict[str, np.ndarray] = {}
    with h5py.File(test_path, "r") as f:
        for study in info.studies:
            g = f[study]
            names = sorted(k for k in g["rois"] if k.startswith("lesion"))
            if OLD_LESION not in names:
                raise DatasetError(f"{test_path}: study '{study}' has no ROI '{OLD_LESION}' "
                                   f"(its lesion ROIs: {names})")
            voi, body = (_read(g, f"rois/{k}", test_path).astype(bool)
                         for k in ("liver_voi", "body"))
            lesions = _lesion_rois(g, test_path, names, voi)
            truth = _read(g, "truth", test_path)
            bmi = json.loads(g.attrs.get("attrs", "{}")).get("bmi_class", "")
            for roi, mask in (("liver_voi", voi), ("body", body)):
                if not mask.any():
                    raise DatasetError(f"{test_path}: study '{study}': ROI '{roi}' is empty")
            reference = _read(g, f"{version}/target", test_path)
            noisy = _read(g, f"{version}/realisations", test_path)
            headline = HEADLINE_LESION if HEADLINE_LESION in lesions else OLD_LESION

            measure = functools.partial(lesion_metrics, reference=reference, truth=truth,
                                        voi=voi, lesions=lesions)
            curves[study] = gauss = baseline.curve(noisy, measure)
            z = int(np.argmax(lesions[OLD_LESION][0].sum(axis=(1, 2))))
            for name, images in _outputs(noisy, loaded):
                m = measure(images)
                cov = m["liver_cov_pct"]
                per_lesion = {
                    roi: {**info_, "bias_pct": m[f"{roi}/bias_pct"],
                          "crc_pct": m[f"{roi}/crc_pct"],
                          "gain_bias_pct": baseline.gain(gauss, f"{roi}/bias_pct",
                                                         m[f"{roi}/bias_pct"], cov),
                          "gain_crc_pct": baseline.gain(gauss, f"{roi}/crc_pct",
                                                        m[f"{roi}/crc_pct"], cov)}
                    for roi, (_, _, info_) in lesions.items()}
                old = per_lesion[OLD_LESION]
                rows.append({"network": name, "study": study, "bmi_class": bmi,
                             "lesion_bias_pct": old["bias_pct"],
                             "liver_cov_pct": cov,
                             "lesion_bias_truth_pct": lesion_bias(
                                 images, truth, lesions[OLD_LESION][0]),
                             "contrast_recovery_pct": old["crc_pct"],
                             "gain_pct": old["gain_bias_pct"],
                             "headline_lesion": headline,
                             "headline_bias_pct": per_lesion[headline]["bias_pct"],
                             "headline_gain_pct": per_lesion[headline]["gain_bias_pct"],
                             "psnr_db": body_psnr(images, reference, body),
                             "ssim": body_ssim(images, reference, body),
                             "lesions": per_lesion,
                             "checkpoint": loaded[name][3] if name in loaded else None})
                examples[f"{name}/{study}"] = images[0, z]
    return {"rows": rows, "gaussian": curves, "examples": examples, "version": version,
            "test": str(test_path)}


def lesion_metrics(images: np.ndarray, reference: np.ndarray, truth: np.ndarray,
                   voi: np.ndarray, lesions: Mapping[str, tuple[np.ndarray, np.ndarray, Any]]
                   ) -> dict[str, float]:
    """Liver CoV and, per lesion ROI, ``<roi>/bias_pct`` (against ``reference``) and
    ``<roi>/crc_pct`` (against ``truth``, over the lesion's background ROI) of ``(R, Z, H,
    W)`` images. ``lesions``: name -> ``(mask, background mask, info)``."""
    out = {"liver_cov_pct": liver_cov(images, voi)}
    for name, (mask, background, _) in lesions.items():
        out[f"{name}/bias_pct"] = lesion_bias(images, reference, mask)
        out[f"{name}/crc_pct"] = contrast_recovery(images, truth, mask, background)
    return out


def _lesion_rois(g: h5py.Group, path: str | Path, names: Sequence[str], voi: np.ndarray
                 ) -> dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    """name -> (lesion mask, background mask, {organ, diameter_mm}) of every lesion ROI.

    A graded lesion's background is its shell ``bg_<organ>_<d>mm``; the others' (the
    original liver lesion) the liver VOI.
    """
    described = {e.get("roi", f"lesion_{i}"): e for i, e in
                 enumerate(json.loads(g.attrs.get("attrs", "{}")).get("lesions", []))}
    out = {}
    for name in names:
        mask = _read(g, f"rois/{name}", path).astype(bool)
        shell = "bg" + name[len("lesion"):]
        background = (_read(g, f"rois/{shell}", path).astype(bool) if shell in g["rois"]
                      else voi)
        for roi, m in ((name, mask), (shell if shell in g["rois"] else "liver_voi",
                                      background)):
            if not m.any():
                raise DatasetError(f"{path}: study '{g.name.strip('/')}': ROI '{roi}' is "
                                   "empty")
        entry = described.get(name, {})
        organ = entry.get("organ", "liver" if name == OLD_LESION else "other")
        out[name] = (mask, background, {"organ": organ,
                                        "diameter_mm": entry.get("diameter_mm")})
    return out


def _read(g: h5py.Group, key: str, path: str | Path) -> np.ndarray:
    """An array open_dataset validated; a failing read (truncated chunk) names it."""
    where = f"{path}: study '{g.name.strip('/')}': key '{key}'"
    return readers.read_array(g[key], where, error=DatasetError)


def _outputs(noisy: np.ndarray, loaded: Mapping[str, Any]):
    yield "input", noisy
    for name, (model, variables, scale, _) in loaded.items():
        yield name, np.stack([denoise_volume(model, variables, r, scale=scale) for r in noisy])


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of the rows: the headline and the original lesion, each with its
    gain over the Gaussian post-filter at the row's liver CoV."""
    lines = ["| network | study | BMI | liver CoV % | headline lesion | bias % | gain vs "
             "Gaussian | 8-10 mm lesion bias % | gain vs Gaussian | bias vs truth % | "
             "contrast recovery % | PSNR dB | SSIM |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['network']} | {r['study']} | {r.get('bmi_class', '')} | "
              f"{r['liver_cov_pct']:.2f} | {r['headline_lesion']} | "
              f"{r['headline_bias_pct']:.2f} | {_signed(r['headline_gain_pct'])} | "
              f"{r['lesion_bias_pct']:.2f} | {_signed(r['gain_pct'])} | "
              f"{r['lesion_bias_truth_pct']:.2f} | {r['contrast_recovery_pct']:.1f} | "
              f"{r['psnr_db']:.2f} | {r['ssim']:.4f} |" for r in rows]
    return "\n".join(lines)


def lesion_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of every lesion of every row: bias and contrast recovery, each
    with its gain over the Gaussian at the row's liver CoV ("off" where the network lies
    off the Gaussian curve)."""
    lines = ["| network | study | lesion | organ | mm | bias % | gain | contrast recovery % "
             "| gain |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, e in sorted(r["lesions"].items(), key=_lesion_order):
            size = "" if e.get("diameter_mm") is None else f"{e['diameter_mm']:.3g}"
            lines.append(f"| {r['network']} | {r['study']} | {name} | {e['organ']} | {size} | "
                         f"{e['bias_pct']:.2f} | {_signed(e['gain_bias_pct'])} | "
                         f"{e['crc_pct']:.1f} | {_signed(e['gain_crc_pct'])} |")
    return "\n".join(lines)


def _lesion_order(item: tuple[str, Mapping[str, Any]]) -> tuple:
    name, e = item
    return (name != OLD_LESION, e.get("organ", ""), e.get("diameter_mm") or 0.0)


def _signed(value: float) -> str:
    return "off" if not np.isfinite(value) else f"{value:+.2f}"


def figure(examples: Mapping[str, np.ndarray], path: str | Path, *,
           make_parent: bool = True) -> None:
    """One realisation's slice through the lesion: a row per study, a column per network
    (``examples`` keys ``"<network>/<study>"``), one grey scale per study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tgd_jax.io.workdir import save_figure

    networks = list(dict.fromkeys(key.rsplit("/", 1)[0] for key in examples))
    studies = list(dict.fromkeys(key.rsplit("/", 1)[1] for key in examples))
    fig, axes = plt.subplots(len(studies), len(networks), squeeze=False,
                             figsize=(2.8 * len(networks), 3 * len(studies)))
    for row, study in zip(axes, studies, strict=True):
        first = next(examples[f"{n}/{study}"] for n in networks if f"{n}/{study}" in examples)
        vmax = float(np.percentile(first, 99.5))
        for ax, name in zip(row, networks, strict=True):
            ax.axis("off")
            if f"{name}/{study}" in examples:
                ax.imshow(examples[f"{name}/{study}"], cmap="gray_r", vmin=0, vmax=vmax)
                ax.set_title(f"{name}, {study}", fontsize=9)
    save_figure(fig, path, make_parent=make_parent)


def gain_figure(result: Mapping[str, Any], path: str | Path, *,
                make_parent: bool = True) -> None:
    """Per study: the headline lesion's bias against liver CoV with the Gaussian curve and
    every network on it (left), and each network's bias gain per lesion size (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tgd_jax.io.workdir import save_figure

    studies = list(result["gaussian"])
    fig, axes = plt.subplots(len(studies), 2, figsize=(11, 4 * len(studies)), squeeze=False)
    for (ax, bx), study in zip(axes, studies, strict=True):
        rows = [r for r in result["rows"] if r["study"] == study]
        gauss, headline = result["gaussian"][study], rows[0]["headline_lesion"]
        ax.plot(gauss["liver_cov_pct"], gauss[f"{headline}/bias_pct"], "k.-", lw=1,
                label="Gaussian post-filter (sigma 0-5 px)")
        for r in rows:
            ax.plot(r["liver_cov_pct"], r["headline_bias_pct"], "o", ms=6, label=r["network"])
            for organ, style in (("liver", "-o"), ("soft", "--s")):
                sized = sorted((e["diameter_mm"], e["gain_bias_pct"])
                               for e in r["lesions"].values()
                               if e["organ"] == organ and e.get("diameter_mm"))
                if sized and r["network"] != "input":
                    bx.plot(*zip(*sized, strict=True), style, ms=4,
                            label=f"{r['network']} ({organ})")
        ax.set(xlabel="liver CoV %", ylabel=f"{headline} bias %",
               title=f"{study} ({rows[0].get('bmi_class', '')} BMI): higher is better")
        ax.legend(fontsize=7)
        bx.axhline(0, color="k", lw=0.8)
        bx.set(xlabel="lesion diameter (mm)", ylabel="bias gain (points)",
               title="gain over the Gaussian at the same liver CoV: above 0 beats a blur")
        if bx.get_legend_handles_labels()[0]:  # the input alone: no network to label
            bx.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, make_parent=make_parent)
