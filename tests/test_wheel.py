"""The package as a user gets it from ``pip install``: a wheel built from the checkout's
files, installed into a fresh environment, run from a folder outside the checkout through
its console scripts (tiny train -> finetune -> online -> denoise, HDF5 and NIfTI), with
nothing of the checkout on the path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import h5py
import nibabel as nib  # a test dependency (pyproject.toml): NIfTI is tested, not skipped
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _sh(*argv, cwd, env, timeout=300):
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"{argv[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv holding only the wheel; its dependencies come from this environment's
    site-packages through a .pth file (whose own .pth files, such as the editable install
    of the checkout, are not processed)."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    src = tmp / "src"
    for name in filter(None, files):  # a copy: building in the checkout writes into it
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    _sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", tmp / "dist", src, cwd=tmp, env=env)
    (wheel,) = (tmp / "dist").glob("tgd_jax-*.whl")
    venv = tmp / "venv"
    _sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp, env=env)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
        "--no-deps", "--no-index", wheel, cwd=tmp, env=env)
    outside = tmp / "elsewhere"
    outside.mkdir()
    return venv / "bin", outside, env


def test_the_wheel_runs_the_commands_outside_the_checkout(installed, toy_data):
    bin_, here, env = installed
    where = _sh(bin_ / "python", "-c", "import tgd_jax.pet.configs as c; print(c.__file__)",
                cwd=here, env=env).stdout.strip()
    assert where.startswith(str(bin_.parent)) and str(ROOT) not in where, where
    assert "--workdir" in subprocess.run([bin_ / "tgd-train", "--helpshort"], cwd=here,
                                         env=env, capture_output=True, text=True).stdout
    # The commands in a chain, as a user runs them (what each writes and prints).
    v1 = here / "v1net"
    out = _sh(bin_ / "tgd-train", f"--workdir={v1}", "--config=configs/train.py:tiny",
              f"--config.data.path={toy_data['train']}", cwd=here, env=env).stdout
    assert "step 12/12" in out and "steps/s" in out and "ETA" in out
    assert json.loads((v1 / "summary.json").read_text())["steps"] == 12
    tgd = here / "tgdnet"
    _sh(bin_ / "tgd-finetune", f"--workdir={tgd}", f"--checkpoint={v1}", "--method=tgd",
        "--phi=0.5", "--config=configs/finetune.py:tiny",
        f"--config.data.path={toy_data['finetune']}", cwd=here, env=env)
    mask = json.loads((tgd / "mask.json").read_text())
    assert mask["phi"] == 0.5 and mask["method"] == "tgd"
    assert (tgd / "kse_hist.png").exists()
    online = here / "online"
    _sh(bin_ / "tgd-online", f"--workdir={online}", f"--checkpoint={tgd}",
        "--config=configs/online.py:tiny", f"--config.data.path={toy_data['online']}",
        cwd=here, env=env)
    assert json.loads((online / "summary.json").read_text())["steps"] == 12
    # denoise: HDF5 in/out, one realisation of a 4D key
    out_h5 = here / "dn.h5"
    _sh(bin_ / "tgd-denoise", f"--checkpoint={online}", f"--input={toy_data['test']}",
        "--study=study_000", "--key=v2/realisations", "--index=2", f"--output={out_h5}",
        cwd=here, env=env)
    with h5py.File(out_h5) as f:
        denoised = f["denoised"][()]
    assert denoised.shape == (5, 32, 32) and np.isfinite(denoised).all()
    # the versions a run records are the installed package's
    versions = json.loads((v1 / "versions.json").read_text())
    assert "tgd-jax" in json.dumps(versions)
    # NIfTI in/out: the same volume gives the same result (up to the (x, y, z) transpose)
    with h5py.File(toy_data["test"]) as f:
        volume = f["study_000/v2/realisations"][2]
    nii = here / "in.nii.gz"
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), affine), nii)
    _sh(bin_ / "tgd-denoise", f"--checkpoint={online}", f"--input={nii}",
        f"--output={here / 'out.nii.gz'}", cwd=here, env=env)
    image = nib.load(here / "out.nii.gz")
    np.testing.assert_allclose(image.get_fdata().transpose(2, 1, 0), denoised, rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_array_equal(image.affine, affine)


def test_a_record_of_the_script_form_names_the_same_job(tmp_path):
    # runs made before the commands moved into the package resume without a rerun
    from tgd_jax.pet import reproduce as rp

    job = next(j for j in rp.plan("demo", tmp_path, tiny=True) if j.name.startswith("v1net"))
    assert job.argv[1:3] == ("-m", "tgd_jax.pet.commands.train")
    # the package's own config, whatever folder reproduce runs from
    config = next(a for a in job.argv if a.startswith("--config="))
    assert config.startswith(f"--config={ROOT / 'tgd_jax' / 'pet' / 'configs' / 'train.py'}")
    old = [job.argv[0], "train.py",
           *(a.replace(config.split(":")[0], "--config=configs/train.py") for a in job.argv[3:])]
    record = tmp_path / "jobs" / f"{job.name}.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"argv": old}))
    assert rp.done(tmp_path, job)
    record.write_text(json.dumps({"argv": [*old, "--config.seed=9"]}))
    with pytest.raises(ValueError, match="was made by another command"):
        rp.done(tmp_path, job)


def test_config_names_resolve_to_the_package_configs_but_a_path_of_ones_own_does_not():
    from tgd_jax.pet import cli

    here = Path.cwd()
    try:
        os.chdir(ROOT.parent)  # no configs/ folder here
        assert (cli._package_config("--config=configs/train.py:demo")
                == f"--config={cli.CONFIGS}/train.py:demo")
        for kept in ("--config=/nowhere/configs/train.py:demo", "--config=train.py",
                     "--config=configs/nosuch.py", "--config.tgd.phi=0.3"):
            assert cli._package_config(kept) == kept
        os.chdir(ROOT)  # a checkout's own configs/ folder is used as it is
        assert (cli._package_config("--config=configs/train.py:demo")
                == "--config=configs/train.py:demo")
    finally:
        os.chdir(here)
