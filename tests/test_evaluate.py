"""The paper's test metrics against hand-computed values, and the evaluation end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tgd_jax.pet import evaluate


def test_lesion_bias_is_the_mean_relative_error_of_the_lesion_means():
    reference = np.full((2, 4, 4), 2.0)
    lesion = np.zeros((2, 4, 4), bool)
    lesion[1, 1:3, 1:3] = True
    images = np.stack([reference * 0.9, reference * 1.3, reference * 0.5])
    # realisation means 1.8, 2.6, 1.0 against 2.0: (-10 + 30 - 50) / 3 = -10 %
    assert evaluate.lesion_bias(images, reference, lesion) == pytest.approx(-10.0)


def test_liver_cov_is_the_mean_voxel_std_over_the_voi_mean():
    voi = np.array([[True, True, False]])
    a = np.array([[1.0, 3.0, 100.0]])
    b = np.array([[3.0, 3.0, -100.0]])
    # voxel stds (ddof 1): sqrt(2), 0 -> mean sqrt(2)/2; VOI mean (1+3+3+3)/4 = 2.5
    expected = (np.sqrt(2) / 2) / 2.5 * 100
    assert evaluate.liver_cov(np.stack([a, b]), voi) == pytest.approx(expected)


def test_evaluate_command_on_toy_data(toy_data, pretrained, tmp_path):
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "evaluate.py"),
                           f"--test={toy_data['test']}", f"--out={tmp_path}",
                           f"--net=tiny={pretrained}"], capture_output=True, text=True,
                          cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| input | study_000 |" in proc.stdout and "| tiny | study_000 |" in proc.stdout
    with h5py.File(toy_data["test"]) as f:
        g = f["study_000"]
        # The definition written out, not evaluate.liver_cov: per-voxel sample standard
        # deviation over the R realisations, averaged over the VOI, over the VOI mean.
        voxels = g["v2/realisations"][()][:, g["rois/liver_voi"][()].astype(bool)]
        r = voxels.shape[0]
        sd = np.sqrt(((voxels - voxels.sum(0) / r) ** 2).sum(0) / (r - 1))
        expected = 100 * float(sd.sum() / sd.size) / float(voxels.sum() / voxels.size)
    import json

    result = json.loads((tmp_path / "evaluation.json").read_text())
    rows = result["rows"]
    assert rows[0]["network"] == "input"
    assert rows[0]["liver_cov_pct"] == pytest.approx(expected)
    assert (tmp_path / "examples.png").stat().st_size > 0
    assert (tmp_path / "gain.png").stat().st_size > 0
    # the input is the curve's sigma-0 point: no gain over itself
    for row in rows:
        gauss = result["gaussian"][row["study"]]
        assert gauss["sigma_px"][0] == 0 and gauss["liver_cov_pct"][0] == pytest.approx(
            rows[0]["liver_cov_pct"] if row["study"] == "study_000" else
            gauss["liver_cov_pct"][0])
        old = row["lesions"]["lesion_0"]
        assert row["gain_pct"] == old["gain_bias_pct"]
        if row["network"] == "input":
            assert old["gain_bias_pct"] == pytest.approx(0.0, abs=1e-9)
            assert old["gain_crc_pct"] == pytest.approx(0.0, abs=1e-9)
        elif old["gain_bias_pct"] is None:  # off the curve (JSON null)
            covs = gauss["liver_cov_pct"]
            assert not min(covs) <= row["liver_cov_pct"] <= max(covs)
        else:
            from tgd_jax.pet import baseline

            assert old["gain_bias_pct"] == pytest.approx(
                old["bias_pct"] - baseline.at_cov(gauss, "lesion_0/bias_pct",
                                                  row["liver_cov_pct"]))
    assert "gain vs Gaussian" in proc.stdout
    # an earlier evaluation is not replaced without --overwrite
    before = (tmp_path / "evaluation.json").read_bytes()
    again = subprocess.run([sys.executable, str(root / "evaluate.py"),
                            f"--test={toy_data['test']}", f"--out={tmp_path}",
                            f"--net=tiny={pretrained}"], capture_output=True, text=True,
                           cwd=root, timeout=300)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "holds an earlier evaluation" in again.stderr and "--overwrite" in again.stderr
    assert (tmp_path / "evaluation.json").read_bytes() == before
    assert "Every lesion" in (tmp_path / "evaluation.md").read_text()


# --- the simulator's extra metrics, against definitions and scikit-image -------------------


def test_contrast_recovery_is_measured_over_true_contrast():
    truth = np.ones((1, 4, 4))
    lesion = np.zeros((1, 4, 4), bool)
    lesion[0, :2, :2] = True
    liver = ~lesion
    truth[lesion] = 5.0  # true contrast 5 / 1 - 1 = 4
    a = np.where(lesion, 3.0, 1.0)  # contrast 2 -> 50 %
    b = np.where(lesion, 8.0, 2.0)  # contrast 3 -> 75 %
    assert evaluate.contrast_recovery(np.stack([a, b]), truth, lesion, liver) == \
        pytest.approx(62.5)
    assert evaluate.contrast_recovery(truth[None], truth, lesion, liver) == pytest.approx(100)


def _noisy_pair(shape=(3, 24, 28), seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    reference = np.stack([np.exp(-((yy - 12) ** 2 + (xx - 14 + z) ** 2) / 40.0) * 4 + 0.5
                          for z in range(shape[0])])
    images = reference[None] + rng.normal(0, 0.3, (2, *shape))
    return images, reference


def test_body_psnr_matches_scikit_image_over_the_body_voxels():
    from skimage.metrics import peak_signal_noise_ratio

    images, reference = _noisy_pair()
    body = reference > 1.0
    top = reference[body].max()
    expected = np.mean([peak_signal_noise_ratio(reference[body], image[body], data_range=top)
                        for image in images])
    assert evaluate.body_psnr(images, reference, body) == pytest.approx(expected, rel=1e-5)


def test_body_ssim_matches_scikit_image_whole_image_and_masked():
    from skimage.metrics import structural_similarity

    images, reference = _noisy_pair()
    pad = evaluate.SSIM_WINDOW // 2
    everywhere = np.ones(reference.shape, bool)
    top = float(reference.max())
    kwargs = dict(data_range=top, gaussian_weights=True, sigma=1.5,
                  use_sample_covariance=False)
    # Whole image: scikit-image's mean SSIM crops the same border; averaged over slices.
    whole = np.mean([[structural_similarity(r, im, **kwargs) for r, im in zip(reference, image,
                                                                              strict=True)]
                     for image in images])
    assert evaluate.body_ssim(images, reference, everywhere) == pytest.approx(whole, abs=1e-4)
    # Masked: scikit-image's full map, border cropped, averaged over the body pixels.
    body = reference > 1.0
    top = float(reference[body].max())
    kwargs["data_range"] = top
    values = []
    for image in images:
        maps = np.stack([structural_similarity(r, im, full=True, **kwargs)[1]
                         for r, im in zip(reference, image, strict=True)])
        inner = (slice(None), slice(pad, -pad), slice(pad, -pad))
        values.append(maps[inner][body[inner]].mean())
    assert evaluate.body_ssim(images, reference, body) == pytest.approx(np.mean(values), abs=1e-4)
    # and it can fail: a worse image scores lower
    assert evaluate.body_ssim(images * 0.5, reference, body) < evaluate.body_ssim(
        images, reference, body)
