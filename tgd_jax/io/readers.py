"""What every reader of a user-named file checks, so that each refusal is one line naming
the file, the key and the problem (a :class:`~tgd_jax.io.errors.UsageError`, exit 2).

The readers (:func:`tgd_jax.pet.dataset.open_dataset`, :func:`tgd_jax.pet.denoise.read_volume`,
``evaluate.py``) accept as a volume only a non-empty HDF5 array of real numbers: floats, or
integers (counts, converted to float32, exact up to 2**24). They refuse groups where an
array is expected (and arrays where a group is), complex, boolean, string, compound,
enumerated and opaque data, empty arrays, values beyond float32's range, and files that are
missing, folders, symbolic link loops, unreadable, truncated or not HDF5.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tgd_jax.io.errors import UsageError

__all__ = ["check_input_file", "open_h5", "h5_get", "check_real_dtype", "check_not_empty",
           "read_array", "to_float32"]


def check_input_file(path: str | os.PathLike[str], error: type[UsageError] = UsageError,
                     name: str | None = None) -> Path:
    """``path`` if it names a readable file; else ``error`` saying what it is instead.

    ``name``: what to call the file in the message (default ``path``).
    """
    path = Path(path)
    name = name or str(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except OSError as e:
        problem = ("a loop of symbolic links" if e.errno == errno.ELOOP
                   else f"cannot be opened ({e.strerror})")
        raise error(f"{name}: {problem}") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{name}: is a folder, expected a file")
    if not os.access(path, os.R_OK):
        raise error(f"{name}: no permission to read it")
    return path


def open_h5(path: str | os.PathLike[str], error: type[UsageError] = UsageError,
            name: str | None = None, hint: str = "") -> h5py.File:
    """The HDF5 file at ``path``, open for reading; else ``error`` naming the problem."""
    name = name or str(path)
    check_input_file(path, error, name)
    try:
        return h5py.File(path, "r")
    except OSError as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise error(f"{name}: not a readable HDF5 file, or a truncated one ({first}){hint}"
                    ) from None


def h5_get(parent: h5py.Group, key: str, where: str, *, group: bool = False,
           error: type[UsageError] = UsageError) -> Any:
    """``parent[key]``, checked to be an array (``group=False``) or a group.

    ``key`` is a path below ``parent`` (``v2/realisations``): an absolute one, or one with
    empty, ``.`` or ``..`` parts, would read outside of it, and is refused.
    """
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise error(f"{where}: key {key!r} must be a path below it, such as 'v2/target'")
    try:
        obj = parent[key]
    except KeyError:  # missing, a broken soft link, or an external link to a missing file
        raise error(f"{where}: no key '{key}'") from None
    except (OSError, RuntimeError) as e:
        raise error(f"{where}: key '{key}' is unreadable ({e})") from None
    wanted = h5py.Group if group else h5py.Dataset
    if not isinstance(obj, wanted):
        kind = "a group" if isinstance(obj, h5py.Group) else (
            "an array" if isinstance(obj, h5py.Dataset) else f"a {type(obj).__name__}")
        raise error(f"{where}: key '{key}' is {kind}, expected "
                    f"{'a group' if group else 'an array'}")
    return obj


def check_real_dtype(dtype: np.dtype, where: str, error: type[UsageError] = UsageError,
                     allow_bool: bool = False) -> None:
    """Refuses data that are not real numbers (``allow_bool``: masks may be boolean)."""
    dtype = np.dtype(dtype)
    if h5py.check_enum_dtype(dtype) is not None:
        problem = "enumerated values (labels, not intensities)"
    elif dtype.kind in "fiu" or (allow_bool and dtype.kind == "b"):
        return
    else:
        problem = {"b": "booleans", "c": "complex numbers", "S": "strings", "U": "strings",
                   "O": "strings or objects", "V": "compound or opaque records",
                   "M": "dates", "m": "time spans"}.get(dtype.kind, "no numbers")
    raise error(f"{where}: holds {problem} (dtype {dtype}); expected real numbers"
                + ("" if allow_bool else " (float, or integer counts)"))


def check_not_empty(shape: tuple[int, ...] | None, where: str,
                    error: type[UsageError] = UsageError) -> None:
    """Refuses a dataspace without values (``h5py.Empty``, or a 0 in the shape)."""
    if shape is None or 0 in shape:
        raise error(f"{where}: is empty (shape {shape}); expected an image")


def read_array(d: h5py.Dataset, where: str, index: Any = (),
               error: type[UsageError] = UsageError) -> np.ndarray:
    """``d[index]``; a read that fails (a truncated or damaged file) is ``error``."""
    try:
        return np.asarray(d[index])
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise error(f"{where}: unreadable data, the file may be truncated or damaged "
                    f"({first})") from None


def to_float32(values: np.ndarray, where: str, error: type[UsageError] = UsageError
               ) -> np.ndarray:
    """``values`` as float32; refuses finite values that float32 cannot hold (they would
    become inf, reported later as if the file held non-finite voxels)."""
    with np.errstate(over="ignore", invalid="ignore"):  # counted below
        out = np.asarray(values).astype(np.float32)
    if values.dtype.kind == "f" and values.dtype.itemsize > 4:
        lost = np.isfinite(values) & ~np.isfinite(out)
        if lost.any():
            first = tuple(int(i) for i in np.argwhere(lost)[0])
            raise error(f"{where}: {int(lost.sum())} value(s) beyond float32's range "
                        f"(+-{np.finfo(np.float32).max:.3g}), the first at {first}: "
                        f"{values[first]}")
    return out
