"""When the training loop waits for each step (tgd_jax.train.parallel.one_step_in_flight)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from tgd_jax.errors import UsageError
from tgd_jax.train import parallel


def _mesh(*platforms):
    return types.SimpleNamespace(devices=np.array(
        [types.SimpleNamespace(platform=p) for p in platforms], dtype=object))


@pytest.mark.parametrize("platforms, version, expected", [
    (("cpu", "cpu"), (0, 10), True),  # jaxlib 0.10's in-process all-reduce can deadlock
    (("cpu", "cpu"), (0, 11), True),  # not measured: kept safe
    (("cpu", "cpu"), (0, 12), False),  # not seen there; the wait cost 4 % of the steps/s
    (("cpu",), (0, 10), False),  # one device: no collective
    (("gpu", "gpu"), (0, 10), False),
])
def test_one_step_in_flight_on_old_jaxlib_cpu_meshes_only(platforms, version, expected,
                                                          monkeypatch):
    monkeypatch.delenv(parallel.ONE_STEP_ENV, raising=False)
    monkeypatch.setattr(parallel, "_jaxlib_version", lambda: version)
    assert parallel.one_step_in_flight(_mesh(*platforms)) is expected


def test_the_environment_overrides_and_a_bad_value_is_named(monkeypatch):
    mesh = _mesh("cpu", "cpu")
    for value, expected in (("1", True), ("0", False)):
        monkeypatch.setenv(parallel.ONE_STEP_ENV, value)
        assert parallel.one_step_in_flight(mesh) is expected
    monkeypatch.setenv(parallel.ONE_STEP_ENV, "yes")
    with pytest.raises(UsageError, match=r"\$TGD_ONE_STEP_IN_FLIGHT='yes'"):
        parallel.one_step_in_flight(mesh)


def test_the_installed_jaxlib_version_is_read():
    import jaxlib

    assert parallel._jaxlib_version() == tuple(int(p) for p in jaxlib.__version__.split(".")[:2])
