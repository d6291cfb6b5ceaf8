"""HDF5 datasets of simulated studies: a documented, versioned schema, atomic writes, and a
reader that validates every file and names what is wrong.

Schema (``SCHEMA_VERSION = 1``), one file per dataset::

    /                       attrs: schema_version, role, versions (JSON list), levels_s
                                   (JSON list of s/bed), realisations, sim_config (JSON),
                                   recon_settings (JSON: version -> settings), seed,
                                   voxel_size_mm (JSON [z, y, x]), created, tgd_jax
    /<study>/               attrs: bmi_class, bmi, study_seed, trues_per_slice_120s,
                                   attrs (JSON: lesions, SUVs, body size...)
    /<study>/truth          (Z, n, n) float32, SUV on the reconstruction grid
    /<study>/rois/<name>    (Z, n, n) uint8: body, liver, liver_voi, lesion_<i>, bladder...
    /<study>/<v>/target             (Z, n, n) float32: the 600 s/bed image
    /<study>/<v>/inputs/<sss>       (Z, n, n) float32: inputs at sss s/bed (e.g. 030)
    /<study>/<v>/noiseless          (Z, n, n) float32: reconstruction of the expected data
    /<study>/<v>/halves/{full,a,b}  (Z, n, n) float32: noise-2-noise halves of one scan
    /<study>/<v>/realisations       (R, Z, n, n) float32: i.i.d. short-scan realisations

Which keys a file must hold depends on its role (:data:`ROLE_KEYS`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tgd_jax.errors import DataError
from tgd_jax.io import readers
from tgd_jax.io.errors import UsageError
from tgd_jax.io.workdir import atomic_path

__all__ = [
    "SCHEMA_VERSION",
    "ROLES",
    "ROLE_KEYS",
    "DatasetError",
    "DatasetInfo",
    "write_dataset",
    "open_dataset",
    "load_study",
    "level_key",
]

#: The version of the HDF5 dataset schema this reader and writer implement.
SCHEMA_VERSION = 1
#: The roles a dataset file can have.
ROLES = ("train", "finetune", "test", "online")
#: Per-version keys each role requires ("inputs" expands to one key per level).
ROLE_KEYS: dict[str, tuple[str, ...]] = {
    "train": ("target", "inputs"),
    "finetune": ("target", "inputs"),
    "test": ("target", "realisations"),
    "online": ("halves/full", "halves/a", "halves/b"),
}
_ROOT_ATTRS = ("schema_version", "role", "versions", "levels_s", "sim_config", "seed")
_REQUIRED_ROIS = ("body", "liver_voi")


class DatasetError(DataError):
    """A dataset file is missing, malformed or inconsistent (the message says where)."""


def level_key(seconds: float) -> str:
    """``30 -> 'inputs/030'``: the key of an input count level."""
    return f"inputs/{int(round(seconds)):03d}"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a validated file holds."""

    path: Path
    role: str
    versions: tuple[str, ...]
    levels_s: tuple[float, ...]
    studies: tuple[str, ...]
    attrs: dict[str, Any]


def write_dataset(
    path: str | os.PathLike[str],
    studies: Sequence[Any],
    *,
    role: str,
    versions: Sequence[str],
    levels_s: Sequence[float],
    sim_config: Mapping[str, Any],
    recon_settings: Mapping[str, Any],
    seed: int,
    realisations: int = 0,
    voxel_size_mm: Sequence[float] = (4.0, 4.0, 4.0),
    recipe: Mapping[str, Any] | None = None,
) -> Path:
    """Writes studies (:class:`tgd_jax.sim.study.Study`) atomically, then validates the file.

    The file is written under a temporary name in the same folder and renamed into place
    only once complete and valid: an interrupted run leaves no file under ``path``.
    ``recipe``: everything that determined the studies (stored as the root attribute
    ``recipe``, JSON), so that a later run can tell whether a file holds its dataset.
    """
    if role not in ROLES:
        raise UsageError(f"role must be one of {ROLES}, got {role!r}")
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({
                "schema_version": SCHEMA_VERSION,
                "role": role,
                "versions": json.dumps(list(versions)),
                "levels_s": json.dumps([float(v) for v in levels_s]),
                "realisations": int(realisations),
                "sim_config": json.dumps(sim_config, default=str),
                "recon_settings": json.dumps(recon_settings, default=str),
                "seed": int(seed),
                "voxel_size_mm": json.dumps([float(v) for v in voxel_size_mm]),
                "created": datetime.datetime.now(datetime.UTC).isoformat(),
                "tgd_jax": _package_version(),
                **({"recipe": json.dumps(recipe, sort_keys=True, default=str)}
                   if recipe is not None else {}),
            })
            for i, study in enumerate(studies):
                g = f.create_group(f"study_{i:03d}")
                attrs = study.attrs
                g.attrs.update({
                    "bmi_class": attrs["bmi_class"],
                    "bmi": float(attrs["bmi"]),
                    "study_seed": int(attrs.get("study_seed", -1)),
                    "trues_per_slice_120s": float(attrs["trues_per_slice_120s"]),
                    "attrs": json.dumps(attrs, default=_json_default),
                })
                g.create_dataset("truth", data=study.truth.astype(np.float32), compression="gzip")
                for name, mask in study.rois.items():
                    g.create_dataset(f"rois/{name}", data=mask.astype(np.uint8),
                                     compression="gzip")
                for key, image in study.images.items():
                    g.create_dataset(key, data=image.astype(np.float32), compression="gzip")
        open_dataset(tmp, display_name=str(path))  # never publish a file the reader rejects
    return path


def open_dataset(
    path: str | os.PathLike[str], *, check_values: bool = True, display_name: str | None = None
) -> DatasetInfo:
    """Validates a dataset file and returns what it holds.

    Checks the schema version, the root attributes, and for every study the truth, the
    required ROIs, and each required image of each version: present, float32, the truth's
    shape (``(R, *shape)`` for realisations) and finite (``check_values``).

    Raises:
      DatasetError: naming the file, study, key and problem.
    """
    name = display_name or str(path)
    with readers.open_h5(path, DatasetError, name) as f:
        role, versions, levels = _root(name, f)
        studies = tuple(sorted(k for k in f if isinstance(f.get(k), h5py.Group)))
        if not studies:
            raise DatasetError(f"{name}: no study groups")
        for study in studies:
            _validate_study(name, f[study], role, versions, levels, check_values)
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
    return DatasetInfo(Path(path), role, versions, levels, studies, attrs)


def _root(name: str, f: h5py.File) -> tuple[str, tuple[str, ...], tuple[float, ...]]:
    """The root attributes' role, versions and levels, each checked for its type."""
    for attr in _ROOT_ATTRS:
        if attr not in f.attrs:
            raise DatasetError(f"{name}: missing root attribute '{attr}'")
    try:
        version = int(f.attrs["schema_version"])
    except (TypeError, ValueError):
        raise DatasetError(f"{name}: root attribute 'schema_version' is "
                           f"{f.attrs['schema_version']!r}, expected an integer") from None
    if version != SCHEMA_VERSION:
        raise DatasetError(
            f"{name}: schema version {version}, this reader needs {SCHEMA_VERSION}")
    role = _attr(f.attrs["role"])
    if not isinstance(role, str) or role not in ROLES:
        raise DatasetError(f"{name}: unknown role {role!r} (expected one of {ROLES})")
    versions = _json_list(name, f, "versions", str)
    levels = _json_list(name, f, "levels_s", float)
    if not all(np.isfinite(levels)) or any(v <= 0 for v in levels):
        raise DatasetError(f"{name}: root attribute 'levels_s' is {list(levels)}, expected "
                           "positive seconds per bed")
    bad = [v for v in versions if not v or "/" in v or v in (".", "..")]
    if bad:
        raise DatasetError(f"{name}: root attribute 'versions' holds {bad[0]!r}, not a "
                           "version name")
    return role, versions, levels


def _json_list(name: str, f: h5py.File, attr: str, kind: type) -> tuple[Any, ...]:
    """A root attribute holding a JSON list of ``kind`` (str or float) values."""
    try:
        values = json.loads(_attr(f.attrs[attr]))
        ok = isinstance(values, list) and all(
            isinstance(v, str) if kind is str else
            isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DatasetError(f"{name}: root attribute '{attr}' is {f.attrs[attr]!r}, expected "
                           f"a JSON list of {'names' if kind is str else 'numbers'}")
    return tuple(kind(v) for v in values)


def _validate_study(name: str, g: h5py.Group, role: str, versions: Sequence[str],
                    levels: Sequence[float], check_values: bool) -> None:
    where = f"{name}: study '{g.name.strip('/')}'"
    truth = readers.h5_get(g, "truth", where, error=DatasetError)
    shape = truth.shape
    if shape is None or len(shape) != 3:
        raise DatasetError(f"{where}: key 'truth' has shape {shape}, expected (Z, n, n)")
    _check_array(where, g, "truth", shape, check_values)
    rois = readers.h5_get(g, "rois", where, group=True, error=DatasetError)
    for roi in _REQUIRED_ROIS:
        if roi not in rois:
            raise DatasetError(f"{where}: missing key 'rois/{roi}'")
    for roi in rois:  # every ROI: evaluate.py reads the lesions too
        key = f"rois/{roi}"
        d = readers.h5_get(g, key, where, error=DatasetError)
        readers.check_real_dtype(d.dtype, f"{where}: key '{key}'", DatasetError,
                                 allow_bool=True)
        if d.shape != shape:
            raise DatasetError(f"{where}: key '{key}' has shape {d.shape}, expected {shape}")
    if "attrs" in g.attrs:
        _study_attrs(where, g)
    required = []
    for key in ROLE_KEYS[role]:
        required += [level_key(s) for s in levels] if key == "inputs" else [key]
    for version in versions:
        for key in required:
            full = f"{version}/{key}"
            expected = (None, *shape) if key == "realisations" else shape
            _check_array(where, g, full, expected, check_values)


def _study_attrs(where: str, g: h5py.Group) -> dict[str, Any]:
    """A study's ``attrs`` attribute: a JSON object."""
    try:
        value = json.loads(_attr(g.attrs["attrs"]))
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: attribute 'attrs' is not a JSON object")
    return value


def _check_array(where: str, g: h5py.Group, key: str, shape: tuple, check_values: bool) -> None:
    d = readers.h5_get(g, key, where, error=DatasetError)
    if d.dtype != np.float32:
        raise DatasetError(f"{where}: key '{key}' has dtype {d.dtype}, expected float32")
    if d.shape is None or len(d.shape) != len(shape) or any(
            e is not None and e != s for e, s in zip(shape, d.shape, strict=True)):
        raise DatasetError(f"{where}: key '{key}' has shape {d.shape}, expected "
                           f"{tuple('R' if e is None else e for e in shape)}")
    readers.check_not_empty(d.shape, f"{where}: key '{key}'", DatasetError)
    if check_values:
        values = readers.read_array(d, f"{where}: key '{key}'", error=DatasetError)
        if not np.all(np.isfinite(values)):
            raise DatasetError(f"{where}: key '{key}' holds {int(np.sum(~np.isfinite(values)))} "
                               "NaN or infinite values")


def load_study(path: str | os.PathLike[str], study: str) -> dict[str, Any]:
    """All arrays of one study as a flat dict (``'v2/inputs/030'`` -> array), plus ``attrs``.

    ROIs come back boolean. ``attrs`` holds the study's attributes, its ``attrs`` JSON
    parsed (``{}`` if absent).

    Raises:
      DatasetError: naming the file, study, key and problem (no such study, a study that is
        not a group, an array of strings or records, unreadable data ...).
    """
    out: dict[str, Any] = {}
    with readers.open_h5(path, DatasetError) as f:
        if study not in f:
            raise DatasetError(f"{path}: no study '{study}' (have {sorted(f)})")
        g = readers.h5_get(f, study, f"{path}", group=True, error=DatasetError)
        where = f"{path}: study '{study}'"
        problems: list[str] = []

        def visit(key: str, obj: Any) -> None:
            if not isinstance(obj, h5py.Dataset) or problems:
                return
            try:
                is_roi = key.startswith("rois/")
                readers.check_real_dtype(obj.dtype, f"{where}: key '{key}'", DatasetError,
                                         allow_bool=is_roi)
                value = readers.read_array(obj, f"{where}: key '{key}'", error=DatasetError)
            except DatasetError as e:
                problems.append(str(e))
                return
            out[key] = value.astype(bool) if is_roi else value

        g.visititems(visit)
        if problems:
            raise DatasetError(problems[0])
        out["attrs"] = {k: _attr(v) for k, v in g.attrs.items()}
        out["attrs"]["attrs"] = _study_attrs(where, g) if "attrs" in g.attrs else {}
    return out


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _package_version() -> str:
    from tgd_jax import __version__

    return __version__
