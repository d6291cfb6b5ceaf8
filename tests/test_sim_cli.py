"""The simulator's command line: its refusals, and a user's file kept. Generating datasets
and the report end to end is checked on the tiny reproduction's sim-* jobs
(tests/test_reproduce.py), which run this command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tgd_jax.pet.dataset import open_dataset

# The simulator's command, as the tiny reproduction runs it (whose compiled programs the
# session's cache holds by then): fully optimised.
pytestmark = pytest.mark.usefixtures("optimized_xla")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tgd_jax.sim", *args], capture_output=True,
                          text=True, timeout=900)


def test_a_users_dataset_is_never_replaced_without_overwrite(tmp_path):
    user = tmp_path / "train.h5"
    user.write_bytes(b"a user's own data")
    # the shapes of the tiny reproduction's fine-tuning set: under make test, its simulator
    # programs are in the session's compilation cache by the time this runs
    args = ("--preset=demo", "--role=train", f"--out={tmp_path}", "--studies=1", "--slices=4",
            "--levels=30", "--versions=v2")
    refused = _run(*args)
    assert refused.returncode == 2 and user.read_bytes() == b"a user's own data"
    assert str(user) in refused.stderr and "--overwrite" in refused.stderr
    replaced = _run(*args, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert open_dataset(user).role == "train"


def test_the_backend_probe_line_exists_when_not_silenced():
    # Control for tests/test_reproduce.py's check of the sim-* jobs' logs: under absl's
    # default INFO verbosity, a bare JAX start prints the probe line on this kind of
    # machine (skip where it does not).
    code = ("from absl import app, logging\nimport jax\n"
            "app.run(lambda argv: jax.devices())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    if "Unable to initialize backend" not in proc.stderr:
        pytest.skip("this machine's JAX does not report the platforms it probed")


def test_unknown_role_is_a_usage_error(tmp_path):
    done = _run("--role=validation", f"--out={tmp_path}")
    assert done.returncode != 0 and "unknown role(s) ['validation']" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_levels_are_a_usage_error(tmp_path):
    for bad, message in (("thirty", "--levels must be numbers"), ("900", "must lie in (0, 600]")):
        done = _run(f"--levels={bad}", f"--out={tmp_path}")
        assert done.returncode != 0 and message in done.stderr
    assert list(tmp_path.iterdir()) == []
