"""Run outputs are atomic; the demo runs end to end and writes what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tgd_jax import workdir


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    workdir.write_json(path, {"a": np.float32(1.5), "b": np.arange(3)})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2]}

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        workdir.write_json(path, {"a": 2})
    assert json.loads(path.read_text())["a"] == 1.5  # old content intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temp left


def test_append_jsonl(tmp_path):
    path = tmp_path / "m.jsonl"
    workdir.append_jsonl(path, {"step": 1, "loss": np.float32(0.5)})
    workdir.append_jsonl(path, {"step": 2, "loss": 0.25})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "tgd_jax.demo", f"--workdir={out}", "--size=16",
        "--batch_size=4", "--width_multiplier=0.125", "--pretrain_steps=4",
        "--finetune_steps=2", "--eval_patches=4", "--phi=0.5",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TGD retrained fraction" in done.stdout
    for name in ("config.json", "versions.json", "metrics.jsonl", "tgd_mask.json",
                 "summary.json", "kse_histogram.png", "examples.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {
        "pretrained on A", "noisy input", "full fine-tune", "TGD (paper)", "TGD (projected)"}
    mask = json.loads((out / "tgd_mask.json").read_text())
    assert mask["phi"] == 0.5 and 0.0 <= mask["retrained_fraction"] <= 1.0
    assert json.loads((out / "config.json").read_text())["pretrain_steps"] == 4


def test_demo_rejects_bad_phi(tmp_path):
    cmd = [sys.executable, "-m", "tgd_jax.demo", f"--workdir={tmp_path}", "--phi=1.5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "phi must be in [0, 1]" in done.stderr
    assert not Path(tmp_path, "config.json").exists()
