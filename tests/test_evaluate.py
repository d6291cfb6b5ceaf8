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

    rows = json.loads((tmp_path / "evaluation.json").read_text())["rows"]
    assert rows[0]["network"] == "input"
    assert rows[0]["liver_cov_pct"] == pytest.approx(expected)
    assert (tmp_path / "examples.png").stat().st_size > 0
