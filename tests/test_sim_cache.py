"""The simulator's disk cache: a stored result is the built one bit for bit, each argument
has its own file, a damaged file is rebuilt, off means off, and the count calibration is
read back from it."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from tgd_jax.sim import cache
from tgd_jax.sim.projector import SinogramGeometry
from tgd_jax.sim.study import SimConfig, sensitivity

SMALL = SinogramGeometry(n_bins=24, bin_mm=8.0, n_views=12)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.SIM_CACHE_ENV, str(tmp_path / "sim"))
    return tmp_path / "sim"


def _counted():
    calls = []

    @cache.disk_cached("test-fn")
    def fn(n: int, scale: float):
        calls.append((n, scale))
        rng = np.random.default_rng(n)
        return rng.normal(size=(n, 3)) * scale, np.arange(n, dtype=np.int32)

    return fn, calls


def test_a_stored_result_is_the_built_one_and_is_not_rebuilt(folder):
    fn, calls = _counted()
    built = fn(5, 0.5)
    loaded = fn(5, 0.5)
    assert calls == [(5, 0.5)]
    for b, c in zip(built, loaded, strict=True):
        assert b.dtype == c.dtype and b.tobytes() == c.tobytes()
    fn(6, 0.5)  # other arguments: built, each in its own file
    fn(5, 0.25)
    assert calls == [(5, 0.5), (6, 0.5), (5, 0.25)]
    assert len(list(folder.glob("test-fn-*.npz"))) == 3
    assert not [p for p in folder.iterdir() if not p.name.endswith(".npz")]  # no temporaries


def test_a_change_of_code_or_of_what_xla_computes_with_is_a_new_key(folder, monkeypatch):
    calls = []

    @cache.disk_cached("test-device", device=True)
    def fn(n: int):
        calls.append(n)
        return (np.arange(n),)

    fn(2)
    monkeypatch.setattr(cache, "_source_digest", lambda: "an edited simulator")
    fn(2)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    fn(2)
    monkeypatch.setattr(cache, "_jax_option", lambda name: f"{name}=changed")
    fn(2)
    fn(2)  # the same again: read back
    assert calls == [2, 2, 2, 2] and len(list(folder.glob("test-device-*.npz"))) == 4


def test_a_damaged_file_is_rebuilt_and_replaced(folder):
    fn, calls = _counted()
    first = fn(4, 1.0)
    (path,) = folder.glob("test-fn-*.npz")
    whole = path.read_bytes()
    damages = [whole[:100],  # a write cut short (a full disk, a kill)
               b"\x93NUMPY" + whole[6:],  # not an archive
               whole.replace(b"a1.npy", b"b1.npy")]  # a member's name
    for damaged in damages:
        path.write_bytes(damaged)
        again = fn(4, 1.0)
        assert len(again) == 2 and again[0].tobytes() == first[0].tobytes()
        assert fn(4, 1.0)[1].tobytes() == first[1].tobytes()  # replaced: read back
    assert len(calls) == 1 + len(damages)


@pytest.mark.parametrize("value", ["off", "0", ""])
def test_off_keeps_nothing(tmp_path, monkeypatch, value):
    monkeypatch.setenv(cache.SIM_CACHE_ENV, value)
    monkeypatch.chdir(tmp_path)
    fn, calls = _counted()
    fn(3, 1.0)
    fn(3, 1.0)
    assert len(calls) == 2 and cache.cache_folder() is None
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_made_or_filled_costs_the_build_only(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(cache.SIM_CACHE_ENV, str(tmp_path / "a-file" / "sim"))
    fn, calls = _counted()
    assert fn(3, 1.0)[1].tolist() == [0, 1, 2] and cache.cache_folder() is None
    monkeypatch.setenv(cache.SIM_CACHE_ENV, str(tmp_path / "full"))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    assert fn(3, 1.0)[1].tolist() == [0, 1, 2] and len(calls) == 2
    assert list((tmp_path / "full").iterdir()) == []  # no half-written file


def test_the_calibration_is_read_back_and_keyed_by_the_configuration(folder, monkeypatch):
    from tgd_jax.sim import study

    config = SimConfig(n_slices=2, recon_n=24, recon_pixel_mm=16.0, geometry=SMALL)
    study._sensitivity.cache_clear()
    first = sensitivity(config)
    study._sensitivity.cache_clear()
    with monkeypatch.context() as patch:  # from disk, or this fails
        patch.setattr(study, "make_phantom", lambda *a, **k: pytest.fail("rebuilt"))
        assert sensitivity(config) == first
    with monkeypatch.context() as patch:  # the very float a process without the cache gets
        patch.setenv(cache.SIM_CACHE_ENV, "off")
        study._sensitivity.cache_clear()
        assert sensitivity(config) == first
    study._sensitivity.cache_clear()
    other = sensitivity(SimConfig(n_slices=2, recon_n=24, recon_pixel_mm=12.0, geometry=SMALL))
    study._sensitivity.cache_clear()
    assert other != first and len(list(folder.glob("reference-trues-*.npz"))) == 2
