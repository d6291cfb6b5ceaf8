"""The command lines as a user runs them: help, errors, SIGKILL + resume, the compilation
cache, and the same training step on 1 and on 4 devices. Each command runs in its own
process (the whole chain of commands: tests/test_wheel.py, from an installed wheel)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tgd_jax.train import checkpoints

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def _run(script, *args, check=True, env=None, timeout=300):
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, env=env or ENV, cwd=ROOT, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def _tiny(kind, data, *more):
    return [f"--config={ROOT}/configs/{kind}.py:tiny", f"--config.data.path={data}", *more]


@pytest.mark.parametrize("script, expected", [
    ("train.py", ["--workdir", "--config"]),
    ("finetune.py", ["--workdir", "--method", "--phi", "--checkpoint", "last_k"]),
    ("online.py", ["--workdir", "--checkpoint", "--study", "--phi"]),
    ("denoise.py", ["--checkpoint", "--input", "--output", "--key", "nifti"]),
])
def test_help_explains_the_flags(script, expected):
    out = _run(script, "--helpshort", check=False).stdout  # absl exits 1 after help
    for flag in expected:
        assert flag in out, (script, flag)


@pytest.mark.parametrize("args, message", [
    (["--phi=1.5"], "finetune.py: error: bad config: config.tgd.phi must be in [0, 1]"),
    (["--config.batch_size=3", "--config.data.patch_size=64"],
     "32 x 32 slices are smaller than data.patch_size 64"),
])
def test_errors_end_with_one_clear_line(toy_data, pretrained, tmp_path, args, message):
    proc = _run("finetune.py", f"--workdir={tmp_path}", f"--checkpoint={pretrained}",
                *_tiny("finetune", toy_data["finetune"]), *args, check=False)
    assert proc.returncode == 2  # a usage error: fix the command
    assert message in proc.stderr.strip().splitlines()[-1]


def _params_bytes(workdir):
    params, stats, _, _ = checkpoints.restore(workdir, "latest")
    import jax

    return [np.asarray(x).tobytes() for x in jax.tree.leaves((params, stats))]


def test_sigkill_then_rerun_resumes_bit_identically(toy_data, tmp_path):
    args = [*_tiny("train", toy_data["train"]), "--config.num_steps=300",
            "--config.eval_every=25", "--config.log_every=25"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"--workdir={killed}",
                             *args], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    ckpts = killed / "checkpoints"
    while time.time() < deadline:
        steps = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() \
            else []
        if steps and max(steps) >= 50:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()]
    assert done and max(done) < 300, f"the run was not killed mid-training ({done})"
    out = _run("train.py", f"--workdir={killed}", *args).stdout
    assert f"resuming from {ckpts} at step" in out
    clean = tmp_path / "clean"
    _run("train.py", f"--workdir={clean}", *args)
    assert _params_bytes(killed) == _params_bytes(clean)
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]
    assert steps == list(range(25, 301, 25))  # no duplicates after the resume


def test_compilation_cache_loads_programs_and_changes_no_bit(toy_data, tmp_path):
    args = _tiny("train", toy_data["train"], "--config.num_steps=6")
    cache = tmp_path / "cache"
    runs = {}
    # "fill" compiles every program (an empty cache), as a run without a cache does (a run
    # with the cache off: tests/test_no_loss.py's file-size test); "hit" loads them all.
    for name in ("fill", "hit"):
        _run("train.py", f"--workdir={tmp_path / name}", *args,
             env={**ENV, "TGD_COMPILATION_CACHE": str(cache)})
        runs[name] = _params_bytes(tmp_path / name)
        recorded = json.loads((tmp_path / name / "versions.json").read_text())
        assert recorded["compilation_cache"] == str(cache)
        if name == "fill":
            entries = sorted(p.name for p in cache.iterdir())
            assert entries, "nothing was cached"
    # The second process found every program it needed: nothing new was written.
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert runs["hit"] == runs["fill"]


FOUR_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from tgd_jax.pet import config as config_lib
    from tgd_jax.train import parallel, checkpoints
    from tgd_jax.pet import pipeline
    assert jax.device_count() == 4, jax.devices()
    def cfg(**kw):
        c = config_lib.train_config("tiny")
        c.data.path = sys.argv[1]
        c.batch_size = 8
        c.num_steps = 6
        # The default optimizer (Adam + coupled L2): it turns the rounding noise of an
        # exactly-zero gradient into a full-size step, so this holds only because the
        # DnCNN has no dead parameters (no conv bias before a BatchNorm).
        for k, v in kw.items():
            setattr(c, k, v)
        return c
    results = {}
    for n in (1, 4):
        pipeline.train(cfg(), f"{sys.argv[2]}/d{n}", log=lambda m: None,
                   mesh=parallel.make_mesh(n))
        params, stats, _, _ = checkpoints.restore(f"{sys.argv[2]}/d{n}", "latest")
        results[n] = jax.tree.leaves((params, stats))
    # float32 reduction order differs between 1 and 4 devices: compare to tolerance
    worst = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-3))
                for a, b in zip(results[1], results[4]))
    print("WORST_RELATIVE", worst)
    try:
        pipeline.train(cfg(batch_size=6), f"{sys.argv[2]}/bad", log=lambda m: None)
    except ValueError as e:
        print("ERROR", e)
""")


def test_one_and_four_devices_give_the_same_parameters(toy_data, tmp_path):
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES, str(toy_data["train"]),
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.split("WORST_RELATIVE")[1].split()[0])
    assert worst < 1e-5, worst
    assert "ERROR batch_size=6 is not divisible by the 4 devices of the mesh" in proc.stdout
    # a checkpoint written on a 4-device mesh loads in this 1-device process (orbax would
    # otherwise ask for the saved 4-device sharding)
    four, _, _, _ = checkpoints.restore(tmp_path / "d4", "latest")
    one, _, _, _ = checkpoints.restore(tmp_path / "d1", "latest")
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * (np.max(np.abs(a)) + 1e-3))

