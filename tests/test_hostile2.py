"""Hostile input, round 2: readers of user-named files, fuzzed inputs and flags, one run per
workdir, failing writers and clean exits. One test (or more) per class of the issue;
docs/reliability.md has the table.

The fuzz tests are property-based (hypothesis, derandomized, a fixed example budget): each
generated input must give either a clean refusal (a one-line UsageError / exit code 2,
nothing written) or the correct result, which an oracle in this file computes from what
was generated, without the library's reader.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import importlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest
from absl import flags
from conftest import quiet, tiny_train_config
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tgd_jax.io import errors
from tgd_jax.io import workdir as workdir_lib
from tgd_jax.io.errors import RunError, UsageError
from tgd_jax.pet import config as config_lib
from tgd_jax.pet import denoise as denoise_lib
from tgd_jax.pet import pipeline, training
from tgd_jax.pet.dataset import DatasetError, load_study, open_dataset
from tgd_jax.pet.denoise import denoise_file, denoise_volume, read_volume
from tgd_jax.pet.models import network_of
from tgd_jax.train import checkpoints

nib = pytest.importorskip("nibabel")

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
ENV.pop("TGD_VERBOSE", None)
FUZZ = dict(derandomize=True, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _one_line(proc, code, *fragments):
    """Exit ``code``, exactly one stderr line holding ``fragments``, and no traceback at all
    (orbax's and asyncio's included)."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _refusal(error: BaseException, *fragments: str) -> str:
    """A refusal as the commands report it: one line, exit code 2, naming ``fragments``."""
    assert errors.exit_code(error) == 2, (type(error), error)
    line = errors.one_line(error)
    assert line and "\n" not in str(error), repr(error)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


# 1. Readers: an object of the wrong kind, a rank, a dtype, empty, truncated, a loop ----

H5_DTYPES = {
    "float16": np.float16, "float32": np.float32, "float64": np.float64, "int8": np.int8,
    "uint16": np.uint16, "int32": np.int32, "uint64": np.uint64, "bool": np.bool_,
    "complex64": np.complex64, "bytes": "S3", "compound": [("a", "<f4"), ("b", "<i2")],
    "enum": h5py.enum_dtype({"low": 0, "high": 1}, basetype="i1"),
}
REAL = {"float16", "float32", "float64", "int8", "uint16", "int32", "uint64"}


def _values(rng: np.random.Generator, name: str, shape: tuple[int, ...], huge: bool):
    """Random data of H5_DTYPES[name]; ``huge``: float64 beyond float32's range."""
    if name in ("bool", "enum"):
        return rng.integers(0, 2, shape).astype(bool if name == "bool" else np.int8)
    if name == "bytes":
        return rng.integers(0, 999, shape).astype("S3")
    if name == "compound":
        out = np.zeros(shape, H5_DTYPES["compound"])
        out["a"] = rng.normal(size=shape)
        return out
    if name == "complex64":
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    dtype = np.dtype(H5_DTYPES[name])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), shape, dtype=dtype)
    values = (rng.normal(size=shape) * 10).astype(dtype)
    if huge and name == "float64" and values.size:
        values.flat[rng.integers(values.size)] = 1e300
    return values


# Half of the draws lean towards readable volumes, so that both outcomes are exercised.
volume_shapes = st.one_of(
    st.tuples(st.integers(2, 4), st.integers(1, 4), st.integers(1, 4)),
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    st.lists(st.integers(0, 4), min_size=0, max_size=5).map(tuple))
h5_cases = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(sorted(REAL)), st.sampled_from(sorted(H5_DTYPES))),
    "shape": volume_shapes,
    "study": st.sampled_from(["group"] * 5 + ["array"]),
    "key": st.sampled_from(["array"] * 8 + ["group", "missing", "absolute", "dotdot",
                                             "softlink", "softlink"]),
    "index": st.sampled_from([0, 0, 1, 2, -1]),
    "huge": st.booleans(),
    "truncate": st.sampled_from([None] * 6 + [0.3, 0.8]),
    "seed": st.integers(0, 2**16),
})


def _write_h5_case(path: Path, c: dict) -> tuple[str, np.ndarray | None]:
    """Writes the case; returns the key to ask for and the array stored there (if any)."""
    rng = np.random.default_rng(c["seed"])
    data = _values(rng, c["dtype"], c["shape"], c["huge"])
    key = {"absolute": "/outside", "dotdot": "v/../v/img", "softlink": "v/link"}.get(
        c["key"], "v/img")
    with h5py.File(path, "w") as f:
        f.create_dataset("outside", data=np.ones((3, 4, 4), np.float32))
        if c["study"] == "array":
            f.create_dataset("s", data=np.zeros(3))
            return key, None
        g = f.create_group("s")
        if c["key"] == "group":
            g.create_group("v/img").create_dataset("x", data=np.ones((3, 4, 4), np.float32))
        elif c["key"] == "softlink":
            g.create_dataset("v/real", data=data, dtype=H5_DTYPES[c["dtype"]])
            g["v/link"] = h5py.SoftLink("/s/v/real")
        elif c["key"] != "missing":
            g.create_dataset("v/img", data=data, dtype=H5_DTYPES[c["dtype"]])
    if c["truncate"]:
        raw = path.read_bytes()
        path.write_bytes(raw[:int(len(raw) * c["truncate"])])
    return key, data


def _expected_h5(c: dict, data: np.ndarray | None) -> np.ndarray | None:
    """The oracle: the float32 volume the reader must return, or None for a refusal."""
    if (c["truncate"] or c["study"] != "group" or data is None
            or c["key"] in ("group", "missing", "absolute", "dotdot")
            or c["dtype"] not in REAL or 0 in c["shape"]):
        return None
    if len(c["shape"]) == 4:
        if not 0 <= c["index"] < c["shape"][0]:
            return None
        data = data[c["index"]]
    if data.ndim != 3 or data.shape[0] < 2:
        return None
    wide = data.astype(np.float64)
    if not np.all(np.isfinite(wide.astype(np.float32))):
        return None
    return wide.astype(np.float32)


@settings(max_examples=40, **FUZZ)
@given(c=h5_cases)
def test_fuzz_read_volume_hdf5(c):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "in.h5"
        key, data = _write_h5_case(path, c)
        expected = _expected_h5(c, data)
        before = sorted(os.listdir(folder))
        try:
            volume, affine = read_volume(path, study="s", key=key, index=c["index"])
        except UsageError as error:
            event("refused")
            assert expected is None, (c, error)
            _refusal(error, str(path))
            if not c["truncate"] and c["study"] == "group":
                _refusal(error, key)
        else:
            event("read")
            assert expected is not None, c
            assert volume.dtype == np.float32 and affine is None
            np.testing.assert_array_equal(volume, expected)
        assert sorted(os.listdir(folder)) == before  # a reader writes nothing


NIFTI_DTYPES = {"float32": np.float32, "float64": np.float64, "int16": np.int16,
                "uint8": np.uint8, "complex64": np.complex64,
                "rgb": [("R", "u1"), ("G", "u1"), ("B", "u1")]}

nifti_cases = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(["float32", "float64", "int16", "uint8"]),
                       st.sampled_from(sorted(NIFTI_DTYPES))),
    "shape": st.one_of(
        st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(2, 4)),
        st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(2, 4), st.just(1)),
        st.lists(st.integers(0, 4), min_size=2, max_size=5).map(tuple)),
    "slope": st.one_of(st.sampled_from([None, 1.0, 2.5]), st.sampled_from(
        [None, 0.0, float("nan"), 1.0, 2.5, -1.0, float("inf"), 1e38])),
    "inter": st.one_of(st.sampled_from([None, 0.0, 3.0]), st.sampled_from(
        [None, 0.0, 3.0, float("nan"), float("inf")])),
    "gz": st.booleans(),
    "truncate": st.sampled_from([None, None, None, 120, 0.8]),
    "huge": st.booleans(),
    "seed": st.integers(0, 2**16),
})


def _write_nifti_case(path: Path, c: dict) -> np.ndarray:
    """Writes the case with nibabel, then patches scl_slope/scl_inter (bytes 112-119 of a
    NIfTI-1 header) and truncates as asked (``c["cut"]``: whether bytes were cut); returns
    the stored array."""
    rng = np.random.default_rng(c["seed"])
    shape = c["shape"]
    if c["dtype"] == "rgb":
        data = np.zeros(shape, NIFTI_DTYPES["rgb"])
        data["R"] = rng.integers(0, 255, shape)
    elif c["dtype"] == "complex64":
        data = (rng.normal(size=shape) + 1j).astype(np.complex64)
    elif c["dtype"] in ("int16", "uint8"):
        data = rng.integers(0, 200, shape).astype(NIFTI_DTYPES[c["dtype"]])
    else:
        data = (rng.normal(size=shape) * 10).astype(NIFTI_DTYPES[c["dtype"]])
        if c["huge"] and c["dtype"] == "float64" and data.size:
            data.flat[0] = 1e300
    plain = path.with_name("plain.nii")
    nib.save(nib.Nifti1Image(data, np.eye(4)), plain)
    raw = bytearray(plain.read_bytes())
    plain.unlink()
    for offset, value in ((112, c["slope"]), (116, c["inter"])):
        if value is not None:
            raw[offset:offset + 4] = struct.pack("<f", value)
    raw = gzip.compress(bytes(raw)) if c["gz"] else bytes(raw)
    if c["truncate"]:  # a byte count beyond the file's length cuts nothing
        keep = c["truncate"] if isinstance(c["truncate"], int) else int(len(raw) *
                                                                        c["truncate"])
        c["cut"] = keep < len(raw)
        raw = raw[:keep]
    path.write_bytes(raw)
    return data


def _expected_nifti(c: dict, data: np.ndarray) -> np.ndarray | None:
    """The oracle: NIfTI-1's scaling (value = slope * stored + inter, unless the slope is
    0 or NaN, which mark unscaled data) in float64, and the documented refusals."""
    if c.get("cut") or c["dtype"] in ("complex64", "rgb"):
        return None
    # None: left as nibabel wrote it, slope 1 and intercept 0
    slope = np.float32(1.0 if c["slope"] is None else c["slope"])
    inter = np.float32(0.0 if c["inter"] is None else c["inter"])
    unscaled = slope == 0 or np.isnan(slope)
    if np.isinf(slope) or (unscaled and np.isfinite(inter) and inter != 0) or (
            not unscaled and not np.isfinite(inter)):
        return None
    shape = c["shape"][:3] if len(c["shape"]) == 4 and c["shape"][3] == 1 else c["shape"]
    if len(shape) != 3 or 0 in shape or shape[2] < 2:
        return None
    values = data.reshape(shape).astype(np.float64)
    if not unscaled:
        values = values * float(slope) + float(inter)
    if not np.all(np.isfinite(values.astype(np.float32))):
        return None
    return values.astype(np.float32).transpose(2, 1, 0)


@settings(max_examples=40, **FUZZ)
@given(c=nifti_cases)
def test_fuzz_read_volume_nifti(c):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("in.nii.gz" if c["gz"] else "in.nii")
        data = _write_nifti_case(path, c)
        expected = _expected_nifti(c, data)
        try:
            volume, affine = read_volume(path)
        except UsageError as error:
            event("refused")
            assert expected is None, (c, error)
            _refusal(error, str(path))
        else:
            event("read")
            assert expected is not None, c
            assert volume.dtype == np.float32 and affine.shape == (4, 4)
            np.testing.assert_allclose(volume, expected, rtol=1e-6)
        assert sorted(os.listdir(folder)) == [path.name]


def _h5(path: Path, build) -> Path:
    with h5py.File(path, "w") as f:
        build(f)
    return path


def _nii(path: Path, data: np.ndarray, slope: float | None = None,
         inter: float | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    for offset, value in ((112, slope), (116, inter)):
        if value is not None:
            raw[offset:offset + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(raw))
    return path


VOLUME = np.ones((3, 4, 4), np.float32)
READER_CASES = {
    # name: (make(folder) -> (path, study, key), what the one line must say)
    "group as the volume": (lambda d: (_h5(d / "a.h5", lambda f: f.create_group(
        "s/v/img")), "s", "v/img"), "key 'v/img' is a group, expected an array"),
    "array as the study": (lambda d: (_h5(d / "a.h5", lambda f: f.create_dataset(
        "s", data=VOLUME)), "s", "v/img"), "key 's' is an array, expected a group"),
    "key outside the study": (lambda d: (_h5(d / "a.h5", lambda f: (
        f.create_group("s"), f.create_dataset("x", data=VOLUME))), "s", "/x"),
        "must be a path below it"),
    "2D array": (lambda d: (_h5(d / "a.h5", lambda f: f.create_dataset(
        "s/k", data=VOLUME[0])), "s", "k"), "has shape (4, 4), expected a 3D"),
    "one slice": (lambda d: (_h5(d / "a.h5", lambda f: f.create_dataset(
        "s/k", data=VOLUME[:1])), "s", "k"), "has 1 slice"),
    "complex": (lambda d: (_h5(d / "a.h5", lambda f: f.create_dataset(
        "s/k", data=VOLUME.astype(np.complex64))), "s", "k"), "complex numbers"),
    "bool": (lambda d: (_h5(d / "a.h5", lambda f: f.create_dataset(
        "s/k", data=VOLUME > 0)), "s", "k"), "booleans"),
    "strings": (lambda d: (_h5(d / "a.h5", lambda f: f.create_dataset(
        "s/k", data=VOLUME.astype("S3"))), "s", "k"), "strings"),
    "compound": (lambda d: (_h5(d / "a.h5", lambda f: f.create_dataset(
        "s/k", data=np.zeros((3, 4, 4), [("a", "f4"), ("b", "f4")]))), "s", "k"),
        "compound"),
    "empty": (lambda d: (_h5(d / "a.h5", lambda f: f.create_dataset(
        "s/k", data=np.zeros((3, 0, 4), np.float32))), "s", "k"), "is empty"),
    "beyond float32": (lambda d: (_h5(d / "a.h5", lambda f: f.create_dataset(
        "s/k", data=np.full((3, 4, 4), 1e300))), "s", "k"), "beyond float32's range"),
    "NIfTI 2D": (lambda d: (_nii(d / "a.nii", VOLUME[0]), "", ""), "a 2D NIfTI image"),
    "NIfTI 4D": (lambda d: (_nii(d / "a.nii", np.ones((4, 4, 3, 2), np.float32)), "", ""),
                 "a 4D NIfTI image"),
    "NIfTI complex": (lambda d: (_nii(d / "a.nii", VOLUME.astype(np.complex64)), "", ""),
                      "complex numbers"),
    "NIfTI slope 0 with an intercept": (lambda d: (_nii(d / "a.nii", VOLUME.astype(
        np.int16), slope=0.0, inter=5.0), "", ""), "unusable intensity scaling"),
    "NIfTI slope NaN with an intercept": (lambda d: (_nii(d / "a.nii", VOLUME.astype(
        np.int16), slope=float("nan"), inter=5.0), "", ""), "unusable intensity scaling"),
    "NIfTI infinite slope": (lambda d: (_nii(d / "a.nii", VOLUME.astype(np.int16),
                                             slope=float("inf"), inter=0.0), "", ""),
                             "unusable intensity scaling"),
    "truncated HDF5": (lambda d: (_cut(_h5(d / "a.h5", lambda f: f.create_dataset(
        "s/k", data=np.ones((3, 64, 64), np.float32))), 0.5), "s", "k"), "truncated"),
    "truncated NIfTI": (lambda d: (_cut(_nii(d / "a.nii", np.ones((64, 64, 3), np.float32)),
                                        0.5), "", ""), "truncated"),
    "symlink loop": (lambda d: (_loop(d / "a.h5"), "s", "k"), "a loop of symbolic links"),
    "a folder": (lambda d: (_folder(d / "a.nii.gz"), "", ""), "is a folder"),
}


def _cut(path: Path, fraction: float) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * fraction)])
    return path


def _loop(path: Path) -> Path:
    other = path.with_name("b.h5")
    path.symlink_to(other)
    other.symlink_to(path)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("case", sorted(READER_CASES))
def test_read_volume_refuses_each_class_in_one_line(tmp_path, case):
    make, message = READER_CASES[case]
    path, study, key = make(tmp_path)
    with pytest.raises(UsageError) as caught:
        read_volume(path, study=study, key=key)
    _refusal(caught.value, str(path), message)


def test_integer_counts_and_single_frame_4d_nifti_are_read(tmp_path):
    counts = np.arange(48, dtype=np.uint16).reshape(3, 4, 4)
    path = _h5(tmp_path / "c.h5", lambda f: f.create_dataset("s/k", data=counts))
    np.testing.assert_array_equal(read_volume(path, study="s", key="k")[0], counts)
    frame = np.arange(48, dtype=np.float32).reshape(4, 4, 3, 1)
    volume, _ = read_volume(_nii(tmp_path / "f.nii", frame))
    np.testing.assert_array_equal(volume, frame[..., 0].transpose(2, 1, 0))
    scaled, _ = read_volume(_nii(tmp_path / "s.nii", counts.astype(np.int16), 2.5, 1.0))
    np.testing.assert_array_equal(scaled, (counts * 2.5 + 1).transpose(2, 1, 0))


def test_denoise_names_an_hdf5_object_of_the_wrong_kind_in_one_line(pretrained, tmp_path):
    """The issue's traceback, as a user meets it: --key naming a group."""
    data = _h5(tmp_path / "in.h5", lambda f: (f.create_group("s/v2"),
                                             f.create_dataset("s/x", data=VOLUME)))
    out = tmp_path / "out.h5"
    proc = subprocess.run([sys.executable, str(ROOT / "denoise.py"),
                           f"--checkpoint={pretrained}", f"--input={data}", "--study=s",
                           "--key=v2", f"--output={out}"], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=300)
    _one_line(proc, 2, "denoise.py: error:", str(data), "key 'v2' is a group")
    assert not out.exists()


# Datasets: every mutation of a valid file is refused, naming file, study and key.

def _replace(f: h5py.File, key: str, make) -> None:
    del f[key]
    make(f, key)


DATASET_MUTATIONS = {
    # name: (mutate(open file, study), refused?)
    "group for an image": (lambda f, s: _replace(f, f"{s}/v1/target",
                                                 lambda f, k: f.create_group(k)), True),
    "array for the rois": (lambda f, s: _replace(f, f"{s}/rois", lambda f, k: f.create_dataset(
        k, data=np.zeros((5, 32, 32), np.uint8))), True),
    "group for a lesion roi": (lambda f, s: f[s]["rois"].create_group("lesion_9"), True),
    "compound roi": (lambda f, s: f[s]["rois"].create_dataset(
        "lesion_9", data=np.zeros((5, 32, 32), [("a", "u1")])), True),
    "complex image": (lambda f, s: _replace(f, f"{s}/v1/target", lambda f, k: f.create_dataset(
        k, data=np.ones((5, 32, 32), np.complex64))), True),
    "integer image": (lambda f, s: _replace(f, f"{s}/v1/target", lambda f, k: f.create_dataset(
        k, data=np.ones((5, 32, 32), np.int16))), True),
    "wrong rank": (lambda f, s: _replace(f, f"{s}/v1/target", lambda f, k: f.create_dataset(
        k, data=np.ones((32, 32), np.float32))), True),
    "empty truth": (lambda f, s: _replace(f, f"{s}/truth", lambda f, k: f.create_dataset(
        k, data=np.ones((0, 32, 32), np.float32))), True),
    "attrs not JSON": (lambda f, s: f[s].attrs.__setitem__("attrs", "{oops"), True),
    "versions not a list": (lambda f, s: f.attrs.__setitem__("versions", "v1"), True),
    "role not text": (lambda f, s: f.attrs.__setitem__("role", np.arange(3)), True),
    "schema version not a number": (lambda f, s: f.attrs.__setitem__("schema_version",
                                                                       "one"), True),
    "levels not numbers": (lambda f, s: f.attrs.__setitem__("levels_s", '["a"]'), True),
    "an extra array": (lambda f, s: f[s].create_dataset(
        "notes", data=np.ones(3, np.float32)), False),
    "a root array beside the studies": (lambda f, s: f.create_dataset(
        "readme", data=np.ones(3)), False),
}


@settings(max_examples=20, **FUZZ)
@given(mutation=st.sampled_from(sorted(DATASET_MUTATIONS)), study=st.integers(0, 2),
       truncate=st.sampled_from([None, None, None, 0.6]))
def test_fuzz_open_dataset_and_load_study(toy_data, mutation, study, truncate):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.h5"
        shutil.copy(toy_data["train"], path)
        mutate, refused = DATASET_MUTATIONS[mutation]
        with h5py.File(path, "r+") as f:
            name = sorted(k for k in f if isinstance(f[k], h5py.Group))[study]
            mutate(f, name)
        if truncate:
            raw = path.read_bytes()
            path.write_bytes(raw[:int(len(raw) * truncate)])
            refused = True
        try:
            info = open_dataset(path)
            arrays = {s: load_study(path, s) for s in info.studies}
        except DatasetError as error:
            assert refused, (mutation, error)
            _refusal(error, str(path))
        else:
            assert not refused, mutation
            with h5py.File(toy_data["train"]) as f:  # the untouched arrays, read back
                np.testing.assert_array_equal(arrays[name]["v1/target"],
                                              f[f"{name}/v1/target"][()])
        assert sorted(os.listdir(folder)) == ["train.h5"]


# Checkpoints: restore() of damaged metadata, truncated data, links and files.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False)
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3), max_leaves=6)


@settings(max_examples=15, **FUZZ)
@given(meta=st.one_of(json_values, st.fixed_dictionaries({"config": json_values})),
       damage=st.sampled_from(["meta", "meta", "truncate", "folder", "loop", "file"]))
def test_fuzz_checkpoint_restore(pretrained, meta, damage):
    reference = checkpoints.restore(pretrained, "latest")
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        shutil.copytree(pretrained, run)
        step = run / "checkpoints" / "12"
        path = run
        if damage == "meta":
            (step / "meta" / "metadata").write_text(json.dumps(meta))
        elif damage == "truncate":
            for chunk in (step / "state").rglob("d/*"):
                chunk.write_bytes(chunk.read_bytes()[:7])
        elif damage == "folder":
            (step / "meta" / "metadata").unlink()
            (step / "meta" / "metadata").mkdir()
        elif damage == "loop":
            path = Path(folder) / "loop"
            path.symlink_to(path)
        else:
            path = run / "config.json"
        try:
            restored = checkpoints.restore(path, "latest")
            model, scale = network_of(restored.config, restored.meta["checkpoint"])
        except checkpoints.CheckpointError as error:
            line = errors.one_line(error)
            assert "\n" not in str(error) and (str(step) in line or str(path) in line), line
            assert errors.exit_code(error) in (1, 2)
        else:  # only metadata that still describes the network can load
            assert damage == "meta"
            for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(reference.params),
                            strict=True):
                np.testing.assert_array_equal(a, b)
            assert scale > 0 and model is not None


def test_a_checkpoint_of_integer_parameters_is_not_a_network(tmp_path):
    ckpt = checkpoints.Checkpointer(tmp_path, log=quiet)
    ckpt.save(1, {"params": {"conv": {"kernel": np.arange(6, dtype=np.int32)}}},
              {"config": {}})
    ckpt.close()
    with pytest.raises(checkpoints.CheckpointError) as caught:
        checkpoints.restore(tmp_path, "latest")
    _refusal(caught.value, str(tmp_path / "checkpoints" / "1"), "'conv/kernel' has dtype int32")


# 2. Random flag values for every command, through absl in this process ----------------

class _Reached(BaseException):
    """Raised by a stub where the real work would start: every check before it passed."""

    def __init__(self, **seen):
        super().__init__("reached")
        self.seen = seen


@contextlib.contextmanager
def _command(script: str):
    """Imports a command's module (its flags into absl's FLAGS) and yields its ``main``;
    removes its flags afterwards so the next command can define its own. Flags of the
    shared cli module that the command redefines (reproduce.py's --verbose) are put back."""
    importlib.import_module("tgd_jax.pet.cli")  # its shared flags stay defined
    FLAGS = flags.FLAGS
    before = {name: FLAGS[name] for name in FLAGS}
    clash = {"reproduce.py": ["verbose"], "tgd_jax/sim/__main__.py": ["verbose"]}.get(
        script, [])
    clash = [name for name in clash if name in before]
    for name in clash:
        delattr(FLAGS, name)
    spec = importlib.util.spec_from_file_location(f"_cmd_{abs(hash(script))}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    # a checkout's script imports its command's module, which defines the flags: import it
    # afresh, since the flags are removed below
    package_module = f"tgd_jax.pet.commands.{Path(script).stem}"

    def forget() -> None:  # `from package import name` would also find the attribute
        sys.modules.pop(package_module, None)
        package = sys.modules.get("tgd_jax.pet.commands")
        if package is not None and hasattr(package, Path(script).stem):
            delattr(package, Path(script).stem)

    forget()
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        forget()
        FLAGS.unparse_flags()
        for name in (set(FLAGS) - set(before)) | {n for n in clash if n in FLAGS}:
            delattr(FLAGS, name)
        for name in clash:
            FLAGS[name] = before[name]


def _invoke(module, argv: list[str]) -> tuple[int | None, str, BaseException | None]:
    """Parses ``argv`` with the command's parser and runs ``main`` as absl would.

    Returns (exit code or None when main returned, stderr, a _Reached stub or None)."""
    flags.FLAGS.unparse_flags()
    stderr = io.StringIO()
    saved_argv, sys.argv = sys.argv, argv  # config_flags reads --config.<field> there
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            rest = errors.parse_flags(argv)
            module.main(rest)
        except SystemExit as e:
            return e.code, stderr.getvalue(), None
        except _Reached as reached:
            return None, stderr.getvalue(), reached
        finally:
            sys.argv = saved_argv
    return None, stderr.getvalue(), None


HOSTILE = st.one_of(
    st.integers(-3, 40).map(str),
    st.sampled_from(["", "0", "-1", "nan", "inf", "-inf", "1e400", "abc", "True", "2.5",
                     "[1]", "None", "0.3", "1,2"]),
    st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="\x7f"),
            max_size=6))


def _paths(tmp: Path, toy_data, pretrained) -> dict[str, str]:
    """Named paths a fuzzed path flag may take, good and hostile. The inputs are copies in
    ``tmp``: a fuzzed --output may be any of them (with --overwrite)."""
    source = tmp / "src"
    shutil.copytree(pretrained, source / "pretrained")
    copies = {role: shutil.copy(path, source / f"{role}.h5") for role, path in toy_data.items()}
    a_file = source / "a_file"
    a_file.write_text("x")
    loop = source / "loop"
    loop.symlink_to(loop)
    return {"missing": str(tmp / "nothing" / "here"), "a file": str(a_file),
            "under a file": str(a_file / "x"), "loop": str(loop), "folder": str(source),
            "out.nii.gz": str(tmp / "out.nii.gz"), "pretrained": str(source / "pretrained"),
            "empty": "", **{role: str(path) for role, path in copies.items()}}


def _assert_contract(script: str, code, stderr: str, reached, wrote: list[str]) -> bool:
    """A refusal (exit 2, one line ``<script>: error: ...``, nothing written) or a run that
    got through (True)."""
    if code is None:
        event("got through")
        assert not stderr.strip(), stderr
        return True
    event("refused")
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{script}: error: "), (
        code, stderr)
    assert not wrote, (stderr, wrote)
    return False


def _written(folder: Path, before: dict[str, float]) -> list[str]:
    """Paths under ``folder`` created since ``before`` (path -> mtime), and files modified
    (a folder's time changes with a write test that leaves nothing)."""
    now = {p: p.lstat().st_mtime_ns for p in folder.rglob("*")}
    return sorted(str(p) for p, t in now.items() if str(p) not in before or (
        before[str(p)] != t and not p.is_dir()))


TRAINING_FIELDS = ["config.data.patch_size", "config.data.intensity_scale",
                   "config.batch_size", "config.num_steps", "config.keep_checkpoints",
                   "config.eval_every", "config.log_every", "config.data.val_studies",
                   "config.data.version", "config.seed", "config.optimizer.learning_rate",
                   "config.loss", "config.num_epochs", "config.data.prefetch",
                   "cpu_devices", "config.nope"]
FINETUNE_FIELDS = ["method", "phi", "config.tgd.phi", "config.tgd.mode", "config.last_k",
                   "config.checkpoint_which", "config.tgd.k", "config.tgd.alpha",
                   "config.batch_size", "config.data.version"]
COMMANDS = {
    # script: (fixed flags, fuzzed flags, path flags, examples)
    "train.py": (["--config={root}/configs/train.py:tiny", "--config.data.path={train}",
                  "--workdir={tmp}/w"], TRAINING_FIELDS,
                 ["workdir", "config.data.path"], 14),
    "finetune.py": (["--config={root}/configs/finetune.py:tiny",
                     "--config.data.path={finetune}", "--checkpoint={pretrained}",
                     "--workdir={tmp}/w"], FINETUNE_FIELDS + TRAINING_FIELDS[:4],
                    ["checkpoint", "config.data.path"], 8),
    "online.py": (["--config={root}/configs/online.py:tiny", "--config.data.path={online}",
                   "--checkpoint={pretrained}", "--workdir={tmp}/w"],
                  ["study", "phi", "method", "config.data.version", "config.batch_size"],
                  ["checkpoint", "config.data.path"], 8),
    "denoise.py": (["--checkpoint={pretrained}", "--input={test}", "--study=study_000",
                    "--key=v2/realisations", "--output={tmp}/out.h5"],
                   ["which", "study", "key", "index", "batch_slices", "overwrite"],
                   ["input", "output", "checkpoint"], 14),
    "evaluate.py": (["--test={test}", "--out={tmp}/e"], ["version", "which", "net"],
                    ["test", "out"], 10),
    "threshold.py": (["--checkpoint={pretrained}", "--data={train}", "--out={tmp}/t",
                      "--examples=8", "--random_draws=1", "--phis=0.3"],
                     ["phis", "studies", "random_draws", "combine", "which", "version",
                      "seed"], ["data", "out", "checkpoint"], 10),
    "reproduce.py": (["--out={tmp}/r"], ["preset", "jobs", "model", "tiny", "report_only"],
                     ["out"], 10),
    "tgd_jax/sim/__main__.py": (["--out={tmp}/d"], ["slices", "studies", "levels", "role",
                                                    "realisations", "high_bmi_fraction",
                                                    "preset", "report"], ["out"], 10),
}


def _check_result(script: str, argv: list[str], reached) -> None:
    """What a run that got through must have done (checked against independent facts)."""
    if script in ("train.py", "finetune.py", "online.py"):
        config = reached.seen["config"]
        config_lib.validate(config)  # the config it would train with is a valid one
        workdir = Path(reached.seen["workdir"])
        saved = json.loads((workdir / "config.json").read_text())
        assert saved["config"] == json.loads(json.dumps(config.to_dict()))
    elif script == "denoise.py":
        given = dict(a[2:].split("=", 1) for a in argv[1:] if "=" in a)
        out = Path(given["output"])
        restored = checkpoints.restore(given["checkpoint"], given.get("which", "best"))
        model, scale = network_of(restored.config, restored.meta["checkpoint"])
        volume, _ = read_volume(given["input"], study=given.get("study", ""),
                                key=given.get("key", ""), index=int(given.get("index", 0)))
        expected = denoise_volume(model, {"params": restored.params,
                                          "batch_stats": restored.batch_stats}, volume,
                                  scale=scale, batch_slices=1)
        with h5py.File(out) as f:
            np.testing.assert_allclose(f["denoised"][()], expected, atol=1e-5)
    elif script == "evaluate.py":
        out = Path(dict(a[2:].split("=", 1) for a in argv[1:] if "=" in a)["out"])
        result = json.loads((out / "evaluation.json").read_text())
        nets = sum(a.startswith("--net=") for a in argv)
        assert len(result["rows"]) == (1 + nets) * len(open_dataset(result["test"]).studies)
    elif script == "threshold.py":
        assert reached is not None and reached.seen["phis"]
    elif script == "reproduce.py":  # the jobs would run in a locked folder
        assert reached is None or reached.seen["locked"]
    else:
        assert reached is not None


@pytest.mark.parametrize("script", sorted(COMMANDS))
def test_fuzz_command_flags(script, toy_data, pretrained, monkeypatch):
    fixed, fuzzed, path_flags, examples = COMMANDS[script]
    prog = "python -m tgd_jax.sim" if "sim" in script else script
    # In this process JAX already runs: the CPU split of --cpu_devices cannot change, so
    # only its check runs; the work after the checks is a stub where it is long.
    real_update = jax.config.update
    monkeypatch.setattr(jax.config, "update", lambda name, value: None
                        if name == "jax_num_cpu_devices" else real_update(name, value))

    def reached(**seen):
        for held in list(workdir_lib._HELD.values()):
            held.release()
        raise _Reached(**seen)

    monkeypatch.setattr(training, "fit_pairs", lambda **kw: reached(**kw))
    from tgd_jax.pet import premise, reproduce
    from tgd_jax.sim import generate
    monkeypatch.setattr(premise, "threshold_checkpoint",
                        lambda *a, **kw: reached(phis=kw.get("phis")))
    monkeypatch.setattr(reproduce, "run", lambda jobs, out, **kw: reached(
        locked=(Path(out) / workdir_lib.LOCK_FILE).exists()))
    monkeypatch.setattr(generate, "generate_role", lambda *a, **kw: reached())

    with _command(script) as module:
        @settings(max_examples=examples, **FUZZ)
        @given(data=st.data())
        def run(data):
            with tempfile.TemporaryDirectory() as folder:
                tmp = Path(folder)
                paths = _paths(tmp, toy_data, pretrained)
                argv = [prog] + [a.format(root=ROOT, tmp=tmp, **paths) for a in fixed]
                chosen = data.draw(st.lists(st.sampled_from(fuzzed + path_flags), max_size=3,
                                            unique=True))
                for name in chosen:
                    if name in path_flags:
                        value = data.draw(st.sampled_from(sorted(paths)))
                        value = paths[value]
                    elif name == "net":
                        value = data.draw(st.sampled_from(["A", "input", "=x", "A=" + paths[
                            "pretrained"], "B=" + paths["missing"]]))
                    else:
                        value = data.draw(HOSTILE)
                    argv.append(f"--{name}={value}")
                before = {str(p): p.lstat().st_mtime_ns for p in tmp.rglob("*")}
                code, stderr, stub = _invoke(module, argv)
                if _assert_contract(prog, code, stderr, stub, _written(tmp, before)):
                    _check_result(script, argv, stub)

        run()


# 3. One run per workdir / output folder -----------------------------------------------

TRAIN_ARGS = [f"--config={ROOT}/configs/train.py:tiny", "--config.num_steps=300",
              "--config.eval_every=25", "--config.log_every=25"]


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit())


def _wait_for_checkpoint(proc, workdir: Path, at_least: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "checkpoints").exists() and max(
                _steps(workdir / "checkpoints"), default=0) >= at_least:
            return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint >= {at_least} in {workdir} (exit {proc.poll()})")


def _params(workdir: Path) -> list[bytes]:
    params, stats, _ = checkpoints.load(workdir, "latest")
    return [np.asarray(x).tobytes() for x in jax.tree.leaves((params, stats))]


def _unfinished(workdir: Path) -> list[Path]:
    return [p for p in workdir.rglob("*") if "tmp" in p.name]


def _complete(*steps: Path) -> bool:
    """Whether orbax finished these checkpoints (its last file, then no temporary folder)."""
    try:
        return all((step / "commit_success.txt").exists() or (
            step / "state" / "commit_success.txt").exists() for step in steps) and not any(
            _unfinished(step.parent) for step in steps)
    except OSError:  # a folder renamed while listed: still being written
        return False


def test_second_train_on_a_busy_workdir_is_refused_and_sigterm_stops_cleanly(toy_data,
                                                                            tmp_path):
    command = [sys.executable, str(ROOT / "train.py"), *TRAIN_ARGS,
               f"--config.data.path={toy_data['train']}"]
    first, stopped = tmp_path / "first", tmp_path / "stopped"

    def start(workdir: Path) -> subprocess.Popen:
        return subprocess.Popen([*command, f"--workdir={workdir}"], env=ENV, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    proc = start(first)
    try:
        _wait_for_checkpoint(proc, first, 25)
        proc.send_signal(signal.SIGSTOP)  # mid-training, holding its workdir
        other = start(stopped)  # for the SIGTERM below, started meanwhile
        second = subprocess.run([*command, f"--workdir={first}"], capture_output=True,
                                text=True, env=ENV, cwd=ROOT, timeout=300)
        _one_line(second, 2, "train.py: error:", str(first), f"pid {proc.pid}",
                  f"host {socket.gethostname()}")
    finally:
        proc.send_signal(signal.SIGCONT)

    # SIGTERM mid-training: one line, exit 143, nothing half-written, the lock released.
    _wait_for_checkpoint(other, stopped, 50)
    other.send_signal(signal.SIGTERM)
    other.wait(timeout=120)
    done = _steps(stopped / "checkpoints")
    _one_line(subprocess.CompletedProcess([], other.returncode, "", other.stderr.read()), 143,
              "train.py: error: interrupted by SIGTERM at step",
              f"resume from step {done[-1]}")
    assert done[-1] < 300 and not _unfinished(stopped)
    assert not (stopped / workdir_lib.LOCK_FILE).exists()
    # (that the rerun then ends bit-identical is tested in this process, below)

    # The first run finishes intact.
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert _steps(first / "checkpoints")[-1] == 300 and not _unfinished(first)
    assert not (first / workdir_lib.LOCK_FILE).exists()
    records = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(25, 301, 25))


_HOLDER = ("import sys, time\nfrom tgd_jax.io import workdir\n"
           "workdir.lock_folder(sys.argv[1], 'holder.py')\nprint('locked', flush=True)\n"
           "time.sleep(300)\n")


def test_a_folder_in_use_is_refused_and_a_sigkilled_holder_is_taken_over(tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], env=ENV, cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir_lib.FolderInUseError) as caught:
            workdir_lib.lock_folder(out, "test")
        _refusal(caught.value, str(out), "holder.py", f"pid {holder.pid}",
                 f"host {socket.gethostname()}")
        # Two reproduce.py on one output folder: the second is refused the same way.
        monkeypatch.setattr(jax.config, "update", lambda *a: None)
        with _command("reproduce.py") as module:
            code, stderr, _ = _invoke(module, ["reproduce.py", f"--out={out}",
                                               "--report_only"])
        assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert f"pid {holder.pid}" in stderr and "reproduce.py: error:" in stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((out / workdir_lib.LOCK_FILE).read_text())["pid"] == holder.pid
    lines: list[str] = []
    with workdir_lib.lock_folder(out, "test", log=lines.append) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "took over" in lines[0]
    assert not (out / workdir_lib.LOCK_FILE).exists()


def test_without_flock_a_live_pid_or_another_host_keeps_the_folder(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(workdir_lib.fcntl, "flock", no_flock)
    lock_file = tmp_path / workdir_lib.LOCK_FILE
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for holder, refused in (({"pid": os.getppid(), "host": socket.gethostname()}, True),
                            ({"pid": dead.pid, "host": socket.gethostname()}, False),
                            ({"pid": 1, "host": "elsewhere"}, True)):
        lock_file.write_text(json.dumps({**holder, "command": "other"}))
        if refused:
            with pytest.raises(workdir_lib.FolderInUseError) as caught:
                workdir_lib.lock_folder(tmp_path, "test", log=quiet)
            _refusal(caught.value, f"pid {holder['pid']}", f"host {holder['host']}")
            if holder["host"] == "elsewhere":
                _refusal(caught.value, f"delete {lock_file}")
        else:
            workdir_lib.lock_folder(tmp_path, "test", log=quiet).release()


def test_a_workdir_removed_during_training_stops_the_run(toy_data, tmp_path):
    workdir = tmp_path / "run"

    def log(line: str) -> None:
        if line.startswith("step 6/12"):  # once the step-4 checkpoints are complete
            deadline = time.time() + 60
            while not _complete(workdir / "checkpoints" / "4", workdir / "best" / "4"):
                assert time.time() < deadline, "the step-4 checkpoint never completed"
                time.sleep(0.01)
            shutil.rmtree(workdir)

    with pytest.raises(RunError, match="removed or replaced during the run"):
        pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=log)
    assert not workdir.exists()  # not recreated with a partial run in it


def test_an_output_folder_removed_during_denoising_is_an_error(toy_data, pretrained,
                                                              tmp_path, monkeypatch):
    out = tmp_path / "results" / "out.h5"
    real = denoise_lib.denoise_volume

    def vanish(*args, **kwargs):
        shutil.rmtree(out.parent)
        return real(*args, **kwargs)

    monkeypatch.setattr(denoise_lib, "denoise_volume", vanish)
    with pytest.raises(RunError, match="output folder vanished during the run") as caught:
        denoise_file(pretrained, toy_data["test"], out, study="study_000",
                     key="v2/realisations")
    assert errors.exit_code(caught.value) == 1 and not out.parent.exists()


# 4. A writer that fails half-way ------------------------------------------------------

def test_a_checkpoint_write_failing_half_way_leaves_nothing_and_the_run_resumes(
        toy_data, pretrained, tmp_path, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

    real = handler.JsonCheckpointHandler._save_fn
    calls = []

    async def failing(self, item, directory):
        calls.append(directory)
        if len(calls) == 3:  # checkpoints/8's metadata: half of it, then a full disk
            text = json.dumps(item)
            (directory / self._filename).write_text(text[:len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, item, directory)

    monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", failing)
    workdir = tmp_path / "run"
    with pytest.raises(RunError, match="writing a checkpoint failed") as caught:
        pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=quiet)
    assert "No space left on device" in str(caught.value)
    assert "resume from step 4" in str(caught.value)
    assert _steps(workdir / "checkpoints") == [4] and not _unfinished(workdir)
    monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", real)
    summary = pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=quiet)
    assert summary["resumed_from"] == 4
    assert _params(workdir) == _params(pretrained)


@pytest.mark.parametrize("name", ["out.h5", "out.nii.gz"])
def test_an_output_volume_write_failing_half_way_leaves_no_file(toy_data, pretrained,
                                                                tmp_path, monkeypatch, name):
    def half(path, *args, **kwargs):
        Path(path).write_bytes(b"\x89HDF partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    if name.endswith(".h5"):
        monkeypatch.setattr(denoise_lib, "write_h5", half)
    else:
        monkeypatch.setattr(nib, "save", lambda image, path: half(path))
    out = tmp_path / name
    with pytest.raises(OSError, match="No space left"):
        denoise_file(pretrained, toy_data["test"], out, study="study_000",
                     key="v2/realisations")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    denoise_file(pretrained, toy_data["test"], out, study="study_000", key="v2/realisations")
    if name.endswith(".h5"):
        with h5py.File(out) as f:
            assert f["denoised"].shape == (5, 32, 32)
    else:
        assert read_volume(out)[0].shape == (5, 32, 32)


def test_a_dataset_write_failing_half_way_leaves_no_file(tmp_path, monkeypatch):
    from tgd_jax.sim.synthetic import write_toy_datasets

    real = h5py.Group.create_dataset
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("name"))
        if len(calls) == 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(OSError, match="No space left"):
        write_toy_datasets(tmp_path)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    written = write_toy_datasets(tmp_path)
    assert open_dataset(written["train"]).role == "train"


# 5. Clean exits -----------------------------------------------------------------------

def test_no_orbax_or_asyncio_traceback_after_a_damaged_checkpoint(toy_data, pretrained,
                                                                  tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(pretrained, workdir)
    for chunk in (workdir / "checkpoints" / "12" / "state").rglob("d/*"):
        chunk.write_bytes(b"\x00garbage" * 8)
    out = tmp_path / "out.h5"
    proc = subprocess.run([sys.executable, str(ROOT / "denoise.py"),
                           f"--checkpoint={workdir}", "--which=latest",
                           f"--input={toy_data['test']}", "--study=study_000",
                           "--key=v2/realisations", f"--output={out}"], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=300)
    line = _one_line(proc, 1, "checkpoints/12: unreadable")
    assert "Event loop" not in proc.stderr and not out.exists(), line


def _interrupt_at(prefix: str, signum: int):
    """A log callback that sends this process ``signum`` at the line starting ``prefix``."""
    def log(line: str) -> None:
        if line.startswith(prefix):
            os.kill(os.getpid(), signum)
    return log


def test_ctrl_c_stops_training_with_one_line_and_the_rerun_is_bit_identical(
        toy_data, pretrained, tmp_path, capsys, request):
    workdir = tmp_path / "run"
    config = tiny_train_config(toy_data["train"])
    # A suite started in the background (nohup, `&`) ignores SIGINT, and the commands leave
    # an ignored signal ignored; this test is about Ctrl-C in a terminal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped, errors.reported("train.py"):
        pipeline.train(config, workdir, log=_interrupt_at("step 6/12", signal.SIGINT))
    assert stopped.value.code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.match(r"train\.py: error: interrupted by SIGINT at step \d+; "
                                        r"nothing was half-written; rerun the same command "
                                        r"to resume from step 4 ", lines[0]), lines
    assert _steps(workdir / "checkpoints") == [4] and not _unfinished(workdir)
    assert not (workdir / workdir_lib.LOCK_FILE).exists()
    assert signal.getsignal(signal.SIGINT) is handler  # put back
    summary = pipeline.train(config, workdir, log=quiet)
    assert summary["resumed_from"] == 4 and _params(workdir) == _params(pretrained)


def test_a_signal_during_a_checkpoint_save_waits_for_it(toy_data, pretrained, tmp_path,
                                                        monkeypatch):
    real = checkpoints.Checkpointer._save

    def save_then_signal(self, step, *args):
        if step == 8:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives inside the save
            time.sleep(0.05)
        return real(self, step, *args)

    monkeypatch.setattr(checkpoints.Checkpointer, "_save", save_then_signal)
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped, errors.reported("train.py"):
        pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=quiet)
    assert stopped.value.code == 143
    assert _steps(workdir / "checkpoints") == [4, 8] and not _unfinished(workdir)
    monkeypatch.undo()
    summary = pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=quiet)
    assert summary["resumed_from"] == 8 and _params(workdir) == _params(pretrained)
