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

from tgd_jax.train.errors import UsageError
from tgd_jax.train.workdir import atomic_path

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

SCHEMA_VERSION = 1
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


class DatasetError(UsageError):
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
) -> Path:
    """Writes studies (:class:`tgd_jax.sim.study.Study`) atomically, then validates the file.

    The file is written under a temporary name in the same folder and renamed into place
    only once complete and valid: an interrupted run leaves no file under ``path``.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
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
    if not Path(path).exists():
        raise DatasetError(f"{name}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{name}: not a readable HDF5 file ({e})") from None
    with f:
        for attr in _ROOT_ATTRS:
            if attr not in f.attrs:
                raise DatasetError(f"{name}: missing root attribute '{attr}'")
        version = int(f.attrs["schema_version"])
        if version != SCHEMA_VERSION:
            raise DatasetError(
                f"{name}: schema version {version}, this reader needs {SCHEMA_VERSION}")
        role = str(f.attrs["role"])
        if role not in ROLES:
            raise DatasetError(f"{name}: unknown role '{role}' (expected one of {ROLES})")
        versions = tuple(json.loads(f.attrs["versions"]))
        levels = tuple(float(v) for v in json.loads(f.attrs["levels_s"]))
        studies = tuple(sorted(k for k in f if isinstance(f[k], h5py.Group)))
        if not studies:
            raise DatasetError(f"{name}: no study groups")
        for study in studies:
            _validate_study(name, f[study], role, versions, levels, check_values)
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
    return DatasetInfo(Path(path), role, versions, levels, studies, attrs)


def _validate_study(name: str, g: h5py.Group, role: str, versions: Sequence[str],
                    levels: Sequence[float], check_values: bool) -> None:
    where = f"{name}: study '{g.name.strip('/')}'"
    if "truth" not in g:
        raise DatasetError(f"{where}: missing key 'truth'")
    shape = g["truth"].shape
    if len(shape) != 3:
        raise DatasetError(f"{where}: key 'truth' has shape {shape}, expected (Z, n, n)")
    _check_array(where, g, "truth", shape, check_values)
    for roi in _REQUIRED_ROIS:
        key = f"rois/{roi}"
        if key not in g:
            raise DatasetError(f"{where}: missing key '{key}'")
        if g[key].shape != shape:
            raise DatasetError(f"{where}: key '{key}' has shape {g[key].shape}, expected {shape}")
    required = []
    for key in ROLE_KEYS[role]:
        required += [level_key(s) for s in levels] if key == "inputs" else [key]
    for version in versions:
        for key in required:
            full = f"{version}/{key}"
            expected = (None, *shape) if key == "realisations" else shape
            _check_array(where, g, full, expected, check_values)


def _check_array(where: str, g: h5py.Group, key: str, shape: tuple, check_values: bool) -> None:
    if key not in g:
        raise DatasetError(f"{where}: missing key '{key}'")
    d = g[key]
    if not isinstance(d, h5py.Dataset):
        raise DatasetError(f"{where}: key '{key}' is a group, expected an array")
    if d.dtype != np.float32:
        raise DatasetError(f"{where}: key '{key}' has dtype {d.dtype}, expected float32")
    if len(d.shape) != len(shape) or any(e is not None and e != s
                                         for e, s in zip(shape, d.shape, strict=True)):
        raise DatasetError(f"{where}: key '{key}' has shape {d.shape}, expected "
                           f"{tuple('R' if e is None else e for e in shape)}")
    if check_values:
        values = d[()]
        if not np.all(np.isfinite(values)):
            raise DatasetError(f"{where}: key '{key}' holds {int(np.sum(~np.isfinite(values)))} "
                               "NaN or infinite values")


def load_study(path: str | os.PathLike[str], study: str) -> dict[str, Any]:
    """All arrays of one study as a flat dict (``'v2/inputs/030'`` -> array), plus ``attrs``."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        if study not in f:
            raise DatasetError(f"{path}: no study '{study}' (have {sorted(f)})")
        g = f[study]

        def visit(key: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                value = obj[()]
                out[key] = value.astype(bool) if key.startswith("rois/") else value

        g.visititems(visit)
        out["attrs"] = {k: _attr(v) for k, v in g.attrs.items()}
        out["attrs"]["attrs"] = json.loads(out["attrs"]["attrs"])
    return out


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
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
