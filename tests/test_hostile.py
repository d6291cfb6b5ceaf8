"""Hostile and careless input: one test per defect class of the issue that introduced them.

Each refusal is one line on stderr (exit 2 for usage errors, 1 for failures), nothing is
half-written or overwritten unasked, and nothing is left behind by a run that never started.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest
from conftest import quiet, tiny_train_config

from tgd_jax.io import workdir as workdir_lib
from tgd_jax.io.errors import UsageError
from tgd_jax.pet import config as config_lib
from tgd_jax.pet import evaluate as evaluate_lib
from tgd_jax.pet import pipeline
from tgd_jax.pet.denoise import denoise_volume
from tgd_jax.pet.models import DnCNN
from tgd_jax.train import checkpoints

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
ENV.pop("TGD_VERBOSE", None)


def _run(script, *args):
    command = [sys.executable, *(["-m", script] if "." in script and not script.endswith(
        ".py") else [str(ROOT / script)]), *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=300)


def _one_line(proc, code, *fragments, storage_noise=False):
    """Exit ``code`` and exactly one error line containing ``fragments``; no traceback.

    ``storage_noise``: after a FAILED checkpoint read, orbax/tensorstore's background
    threads may print asyncio "Event loop is closed" tracebacks of their own, racing the
    exit; those lines (and only those) are tolerated there.
    """
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    if storage_noise:  # our line (possibly with their text run into it), none of our frames
        assert not re.search(r'File ".*(tgd_jax|denoise\.py)', proc.stderr), proc.stderr
        lines = [line for line in lines if re.match(r"\S+: error: ", line)]
    else:
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _sha(path):
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def _denoise(pretrained, data, *extra):
    return _run("denoise.py", f"--checkpoint={pretrained}", f"--input={data}",
                "--study=study_000", "--key=v2/realisations", *extra)


# 1. Data loss -------------------------------------------------------------------------

def test_denoise_never_replaces_its_input_or_an_existing_file(toy_data, pretrained, tmp_path):
    data = tmp_path / "test.h5"
    shutil.copy(toy_data["test"], data)
    before = _sha(data)
    _one_line(_denoise(pretrained, data, f"--output={data}"), 2, str(data),
              "would replace the input")
    _one_line(_denoise(pretrained, data, f"--output={data}", "--overwrite"), 2,
              "would replace the input")
    other = tmp_path / "other.h5"
    shutil.copy(toy_data["train"], other)
    _one_line(_denoise(pretrained, data, f"--output={other}"), 2, str(other), "--overwrite")
    assert _sha(data) == before and _sha(other) == _sha(toy_data["train"])
    done = _denoise(pretrained, data, f"--output={other}", "--overwrite")
    assert done.returncode == 0, done.stderr[-2000:]
    with h5py.File(other) as f:
        assert f["denoised"].shape == (5, 32, 32)


# 2. Silent garbage --------------------------------------------------------------------

@pytest.mark.parametrize("value", ["-1", "0"])
def test_batch_slices_below_one_is_refused(toy_data, pretrained, tmp_path, value):
    out = tmp_path / "out.h5"
    _one_line(_denoise(pretrained, toy_data["test"], f"--output={out}",
                       f"--batch_slices={value}"), 2, f"--batch_slices must be >= 1, got {value}")
    assert not out.exists()


def test_non_finite_voxels_and_scales_are_refused_with_their_location():
    model = DnCNN(features=(4, 4, 3))
    variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
    volume = np.ones((4, 8, 8), np.float32)
    volume[2, 5, 1] = np.nan
    with pytest.raises(UsageError, match=r"1 non-finite voxel\(s\), the first at "
                                         r"\(z, y, x\) = \(2, 5, 1\): nan"):
        denoise_volume(model, variables, volume)
    for scale in (0.0, float("nan"), -1.0):
        with pytest.raises(UsageError, match="intensity scale must be finite and > 0"):
            denoise_volume(model, variables, np.ones((4, 8, 8), np.float32), scale=scale)


def test_a_nan_voxel_in_a_file_is_one_line(toy_data, pretrained, tmp_path):
    data = tmp_path / "nan.h5"
    shutil.copy(toy_data["test"], data)
    with h5py.File(data, "r+") as f:
        f["study_000/v2/realisations"][0, 1, 2, 3] = np.nan
    out = tmp_path / "out.h5"
    _one_line(_denoise(pretrained, data, f"--output={out}"), 2, str(data),
              "(z, y, x) = (1, 2, 3)")
    assert not out.exists()


# 3. The wrong network as "best" -------------------------------------------------------

def test_a_workdir_with_only_best_belongs_to_its_config(toy_data, pretrained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(pretrained, workdir)
    shutil.rmtree(workdir / "checkpoints")
    other = tiny_train_config(toy_data["train"], batch_size=8)
    with pytest.raises(UsageError, match=r"different config \(config.batch_size: 4 -> 8\)"):
        pipeline.train(other, workdir, log=quiet)
    (workdir / "config.json").unlink()
    with pytest.raises(UsageError, match="no readable config.json"):
        pipeline.train(other, workdir, log=quiet)


def test_keep_checkpoints_must_allow_a_resume(toy_data, tmp_path):
    with pytest.raises(UsageError, match="config.keep_checkpoints must be finite and > 0"):
        pipeline.train(tiny_train_config(toy_data["train"], keep_checkpoints=0),
                       tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UsageError, match="keep_checkpoints must be >= 1"):
        checkpoints.Checkpointer(tmp_path / "x", keep=0)


# 4. Corrupt checkpoints ---------------------------------------------------------------

def _damage_data(step_folder):
    for chunk in (step_folder / "state").rglob("d/*"):
        chunk.write_bytes(b"\x00garbage" * 8)


def test_resume_falls_back_to_the_newest_intact_checkpoint(toy_data, pretrained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(pretrained, workdir)
    reference = [np.asarray(x).tobytes() for x in jax.tree.leaves(
        checkpoints.load(pretrained, "latest")[:2])]
    _damage_data(workdir / "checkpoints" / "12")
    lines = []
    summary = pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=lines.append)
    skipped = [line for line in lines if line.startswith("skipped damaged checkpoint")]
    assert len(skipped) == 1 and "checkpoints/12: unreadable" in skipped[0]
    assert any("resuming from" in line and "at step 8" in line for line in lines)
    assert summary["resumed_from"] == 8 and (workdir / "damaged" / "checkpoints-12").is_dir()
    # Retrained from step 8 to 12: the same network as the uninterrupted run.
    again = [np.asarray(x).tobytes() for x in jax.tree.leaves(
        checkpoints.load(workdir, "latest")[:2])]
    assert again == reference


def test_damaged_checkpoints_are_one_line_naming_the_folder(toy_data, pretrained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(pretrained, workdir)
    best = next((workdir / "best").iterdir())
    (best / "meta" / "metadata").write_text("{not json")
    out = tmp_path / "out.h5"
    _one_line(_denoise(workdir, toy_data["test"], f"--output={out}"), 1, str(best),
              "unreadable", storage_noise=True)
    shutil.copytree(pretrained, tmp_path / "run2")
    _damage_data(tmp_path / "run2" / "checkpoints" / "12")
    _one_line(_denoise(tmp_path / "run2", toy_data["test"], f"--output={out}",
                       "--which=latest"), 1, "checkpoints/12: unreadable", storage_noise=True)
    assert not out.exists()


# 5. Values that make no sense ---------------------------------------------------------

@pytest.mark.parametrize("field, value", [("data.patch_size", 0), ("data.patch_size", -8),
                                          ("data.intensity_scale", 0.0),
                                          ("data.intensity_scale", float("nan"))])
def test_senseless_config_values_are_refused(toy_data, tmp_path, field, value):
    with pytest.raises(UsageError, match=f"config.{field} must be finite and > 0"):
        pipeline.train(tiny_train_config(toy_data["train"], **{field: value}),
                       tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()


def test_one_slice_in_the_simulator_is_refused(tmp_path):
    _one_line(_run("tgd_jax.sim", "--slices=1", f"--out={tmp_path / 'd'}"), 2,
              "--slices must be >= 2")
    assert not (tmp_path / "d").exists()


def test_empty_rois_are_refused_and_json_holds_no_nan(toy_data, tmp_path):
    with pytest.raises(UsageError, match="lesion ROI is empty"):
        evaluate_lib.lesion_bias(np.ones((2, 3, 4, 4)), np.ones((3, 4, 4)),
                                 np.zeros((3, 4, 4), bool))
    data = tmp_path / "test.h5"
    shutil.copy(toy_data["test"], data)
    with h5py.File(data, "r+") as f:
        lesion = next(k for k in f["study_000/rois"] if k.startswith("lesion"))
        f[f"study_000/rois/{lesion}"][...] = 0
    _one_line(_run("evaluate.py", f"--test={data}", f"--out={tmp_path / 'e'}"), 2,
              f"ROI '{lesion}' is empty")
    workdir_lib.write_json(tmp_path / "x.json", {"a": float("nan"), "b": [np.inf, 1.0]})
    assert json.loads((tmp_path / "x.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-standard {c}")) == {
        "a": None, "b": [None, 1.0]}


# 6. One line instead of a traceback ---------------------------------------------------

def test_bad_outputs_inputs_and_flags_are_one_line(toy_data, pretrained, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _one_line(_run("evaluate.py", f"--test={toy_data['test']}", f"--out={a_file}"), 2,
              str(a_file), "a file is in the way")
    _one_line(_denoise(pretrained, toy_data["test"], f"--output={a_file}/out.h5"), 2,
              "a file is in the way")
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(b"this is not a NIfTI image")
    _one_line(_run("denoise.py", f"--checkpoint={pretrained}", f"--input={fake}",
                   f"--output={tmp_path / 'o.nii.gz'}"), 2, str(fake), "not a readable NIfTI")
    _one_line(_run("train.py", f"--workdir={tmp_path / 'w'}",
                   f"--config={ROOT}/configs/train.py:tiny", "--config.foo=3"), 2,
              "unknown config field or flag foo")
    _one_line(_run("train.py", f"--workdir={tmp_path / 'w'}",
                   f"--config={ROOT}/configs/train.py:tiny",
                   f"--config.data.path={toy_data['train']}", "--config.data.patch_size=-4"),
              2, "config.data.patch_size must be finite and > 0, got -4")
    _one_line(_run("tgd_jax.sim", "--report", f"--out={tmp_path / 'nothing'}"), 2,
              "no such file")
    assert not (tmp_path / "w").exists()


def test_a_checkpoint_that_does_not_fit_its_model_is_one_line(toy_data, pretrained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(pretrained, workdir)
    for step in (workdir / "best").iterdir():  # the stored config now names other widths
        meta = step / "meta" / "metadata"
        record = json.loads(meta.read_text())
        record["config"]["model"]["features"] = [8, 6, 8, 3]
        meta.write_text(json.dumps(record))
    _one_line(_denoise(workdir, toy_data["test"], f"--output={tmp_path / 'o.h5'}"), 2,
              "has shape")


def test_verbose_shows_the_traceback(toy_data, pretrained, tmp_path):
    proc = _denoise(pretrained, toy_data["test"], f"--output={tmp_path / 'o.h5'}",
                    "--batch_slices=0", "--verbose")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# 8. Reruns keep what the first run measured -------------------------------------------

def test_rerunning_a_finished_run_keeps_its_step_zero_loss(toy_data, pretrained, tmp_path):
    first = json.loads((pretrained / "summary.json").read_text())
    workdir = tmp_path / "run"
    shutil.copytree(pretrained, workdir)
    again = pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=quiet)
    assert again["initial_val_loss"] == first["initial_val_loss"] is not None
    assert again["final_val_loss"] == pytest.approx(first["final_val_loss"])


# 9. File modes ------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        workdir_lib.write_json(tmp_path / "a.json", {"x": 1})
        workdir_lib.atomic_write_bytes(tmp_path / "b.bin", b"x")
    finally:
        os.umask(old)
    for name in ("a.json", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


# 10. Ambiguous names ------------------------------------------------------------------

@pytest.mark.parametrize("nets, message", [
    (["A={p}", "A={p}"], "--net name 'A' is given twice"),
    (["input={p}"], "--net name 'input' is taken"),
])
def test_evaluate_refuses_ambiguous_network_names(toy_data, pretrained, tmp_path, nets,
                                                  message):
    args = [f"--net={n.format(p=pretrained)}" for n in nets]
    _one_line(_run("evaluate.py", f"--test={toy_data['test']}", f"--out={tmp_path / 'e'}",
                   *args), 2, message)
    assert not (tmp_path / "e").exists()


def test_the_config_module_refuses_every_bad_field_before_anything_is_written(tmp_path):
    c = config_lib.finetune_config("tiny")
    c.checkpoint = ""
    with pytest.raises(UsageError, match="config.checkpoint must name the network"):
        pipeline.finetune(c, tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()
