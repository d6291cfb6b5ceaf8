"""Denoising whole 3D volumes with a trained 2.5D network.

Each slice ``z`` is denoised from the stack ``(z-1, z, z+1)``; the network's output for the
centre slice is kept. Edge slices use a mirrored neighbour (``z = -1`` reads slice 1), which
keeps the noise of the stack independent, unlike repeating the edge slice itself.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tgd_jax.io import readers
from tgd_jax.io.errors import UsageError
from tgd_jax.io.workdir import atomic_path, check_output_file, output_folder
from tgd_jax.pet.models import network_of

__all__ = ["slice_stacks", "denoise_volume", "denoise_file",
           "read_volume", "write_volume"]


def slice_stacks(volume: np.ndarray) -> np.ndarray:
    """``(Z, H, W) -> (Z, H, W, 3)``: each slice with its neighbours, mirrored at the ends."""
    volume = np.asarray(volume, np.float32)
    if volume.ndim != 3 or volume.shape[0] < 2:
        raise UsageError(f"expected a (Z >= 2, H, W) volume, got shape {volume.shape}")
    padded = np.pad(volume, ((1, 1), (0, 0), (0, 0)), mode="reflect")
    return np.stack([padded[:-2], padded[1:-1], padded[2:]], axis=-1)


@functools.partial(jax.jit, static_argnames="model")
def _apply(model: nn.Module, variables: Any, x: jax.Array) -> jax.Array:
    return model.apply(variables, x, train=False)[..., 1]


def denoise_volume(model: nn.Module, variables: Mapping[str, Any], volume: np.ndarray, *,
                   scale: float = 1.0, batch_slices: int = 8,
                   name: str = "input volume") -> np.ndarray:
    """Denoises a ``(Z, H, W)`` volume; returns ``(Z, H, W)`` float32 in the input's units.

    Args:
      model: the network (inference mode: BatchNorm running statistics).
      variables: ``{"params": ..., "batch_stats": ...}``.
      volume: the image, e.g. SUV.
      scale: the training run's ``data.intensity_scale`` (undone on the output).
      batch_slices: slices per network call (memory vs. speed).
      name: what to call the volume in an error message (e.g. its file).
    """
    if not (np.isfinite(scale) and scale > 0):
        raise UsageError(f"intensity scale must be finite and > 0, got {scale} (the "
                         "checkpoint's data.intensity_scale)")
    if batch_slices < 1:
        raise UsageError(f"batch_slices must be >= 1, got {batch_slices}")
    check_finite_volume(volume, name)
    stacks = slice_stacks(volume) * np.float32(scale)
    variables = {k: v for k, v in variables.items() if v}
    out = np.empty(stacks.shape[:3], np.float32)
    for start in range(0, len(stacks), batch_slices):
        chunk = stacks[start:start + batch_slices]
        n = len(chunk)
        if n < batch_slices:  # one compiled shape for every chunk
            chunk = np.concatenate([chunk, np.zeros((batch_slices - n, *chunk.shape[1:]),
                                                    np.float32)])
        out[start:start + n] = np.asarray(_apply(model, variables, jnp.asarray(chunk)))[:n]
    return out / np.float32(scale)


def check_finite_volume(volume: np.ndarray, where: str = "input volume") -> None:
    """Refuses NaN/inf voxels (a network spreads each one over its receptive field),
    naming the first one as ``(z, y, x)``."""
    bad = ~np.isfinite(volume)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise UsageError(f"{where}: {int(bad.sum())} non-finite voxel(s), the first at "
                         f"(z, y, x) = {first}: {volume[first]}")


def read_volume(path: str | Path, *, study: str = "", key: str = "",
                index: int = 0) -> tuple[np.ndarray, Any]:
    """A ``(Z, H, W)`` float32 volume from HDF5 (``study``/``key``) or NIfTI (``.nii``,
    ``.nii.gz``).

    A 4D HDF5 key (``(R, Z, H, W)`` realisations) gives volume ``index``; a NIfTI image may
    have one frame in a 4th dimension. Floats and integers (counts) are read, as float32.
    Returns the volume and what is needed to write a result alike (the NIfTI affine, or
    None). NIfTI volumes are stored (X, Y, Z) and are transposed to (Z, Y, X).

    Raises:
      UsageError: naming the file (and study and key) and the problem: not a readable file
        (missing, a folder, a link loop, truncated, another format), an object of the wrong
        kind (a group where the volume should be, a study that is an array), data that are
        not real numbers (complex, boolean, strings, records), empty, beyond float32's
        range, of another rank, fewer than 2 slices, or an unusable NIfTI scaling.
    """
    path = Path(path)
    readers.check_input_file(path)
    if path.name.endswith((".nii", ".nii.gz")):
        data, affine = _read_nifti(path)
        where = str(path)
    else:
        data, where = _read_h5_volume(path, study, key, index)
        affine = None
    if data.ndim != 3:
        raise UsageError(f"{where}: has shape {data.shape}, expected a 3D (Z, H, W) volume")
    readers.check_not_empty(data.shape, where)
    if data.shape[0] < 2:
        raise UsageError(f"{where}: has {data.shape[0]} slice; 2.5D denoising needs at "
                         "least 2")
    return data, affine


def _read_h5_volume(path: Path, study: str, key: str, index: int
                    ) -> tuple[np.ndarray, str]:
    """The volume at ``study``/``key`` of an HDF5 file, and how to name it in messages."""
    with readers.open_h5(path, hint="; NIfTI inputs must end in .nii or .nii.gz") as f:
        if not study or not key:
            raise UsageError(f"{path}: HDF5 input needs --study and --key (studies: "
                             f"{sorted(f)})")
        if study not in f:
            raise UsageError(f"{path}: no study '{study}' (have {sorted(f)})")
        g = readers.h5_get(f, study, str(path), group=True)
        where = f"{path}: '{study}/{key}'"
        d = readers.h5_get(g, key, f"{path}: study '{study}'")
        readers.check_real_dtype(d.dtype, where)
        readers.check_not_empty(d.shape, where)
        if len(d.shape) == 4:
            if not 0 <= index < d.shape[0]:
                raise UsageError(f"{where} holds {d.shape[0]} volumes; index {index} is out "
                                 "of range")
            values = readers.read_array(d, where, index)
            where = f"{where}[{index}]"
        else:
            values = readers.read_array(d, where)
    return readers.to_float32(values, where), where


def _read_nifti(path: Path) -> tuple[np.ndarray, Any]:
    """A NIfTI image's data as float32 and its affine, after checking its header.

    The stored type must be real numbers, and the scaling usable: ``scl_slope`` 0 or NaN is
    the standard's (and nibabel's) mark of unscaled data and is read as such, but not with
    an intercept (which would be dropped), and an infinite slope or a non-finite intercept
    is refused.
    """
    nib = _nibabel()
    try:
        if path.name.endswith(".gz"):
            _check_gzip(path)
        image = nib.load(str(path))
        header = _raw_header(nib, image, path)
        stored = np.dtype(image.get_data_dtype())
    except Exception as e:  # noqa: BLE001 - nibabel raises many kinds for bad bytes
        raise UsageError(f"{path}: not a readable NIfTI image ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    readers.check_real_dtype(stored, str(path))
    slope, inter = (float(header[f]) if f in header else float("nan")
                    for f in ("scl_slope", "scl_inter"))
    unscaled = slope == 0 or np.isnan(slope)
    if np.isinf(slope) or (unscaled and np.isfinite(inter) and inter != 0) or (
            not unscaled and not np.isfinite(inter)):
        raise UsageError(f"{path}: unusable intensity scaling in the header (scl_slope "
                         f"{slope}, scl_inter {inter}); fix it, e.g. slope 1 and intercept 0")
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:  # one frame of a time series: a 3D volume
        shape = shape[:3]
    if len(shape) != 3:
        raise UsageError(f"{path}: a {len(image.shape)}D NIfTI image of shape {image.shape}; "
                         "expected one 3D volume")
    readers.check_not_empty(shape, str(path))
    try:
        raw = np.asarray(image.dataobj.get_unscaled(), np.float64).reshape(shape)
    except Exception as e:  # noqa: BLE001 - truncated data: EOFError, zlib, OSError ...
        raise UsageError(f"{path}: unreadable image data, the file may be truncated "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                         ) from None
    # The scaling in float64 here (nibabel may apply it in float32, where it can overflow
    # unseen), then one checked conversion.
    values = raw if unscaled else raw * slope + inter
    data = readers.to_float32(values, f"{path} (x, y, z)")
    return np.ascontiguousarray(data.transpose(2, 1, 0)), image.affine


def _check_gzip(path: Path) -> None:
    """Reads the gzip stream to its end, where its length and CRC are checked: a file cut
    in its last bytes otherwise reads without an error."""
    with gzip.open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def _raw_header(nib: Any, image: Any, path: Path) -> Any:
    """The header as stored (``nib.load`` resets a scaling it ignores to NaN)."""
    with nib.openers.ImageOpener(str(path)) as f:
        return type(image.header).from_fileobj(f)


def denoise_file(checkpoint: str | Path, input_path: str | Path, output_path: str | Path,
                 *, which: str = "best", study: str = "", key: str = "", index: int = 0,
                 batch_slices: int = 8, overwrite: bool = False) -> dict[str, Any]:
    """Loads a checkpoint, denoises one volume from a file and writes the result atomically.

    Everything is checked before the network runs: the output path (not the input, not an
    existing file unless ``overwrite``, in a writable folder), ``batch_slices``, the
    checkpoint against its architecture, and the volume (finite).
    """
    import time

    from tgd_jax.train import checkpoints

    if batch_slices < 1:
        raise UsageError(f"--batch_slices must be >= 1, got {batch_slices}")
    # folders made for the output go again, still empty, if a later check refuses
    with output_folder(Path(output_path).parent):
        check_output_file(output_path, inputs=[input_path], overwrite=overwrite)
        params, batch_stats, config, meta = checkpoints.restore(checkpoint, which)
        model, scale = network_of(config, meta["checkpoint"])
        template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
        checkpoints.check_tree_match(template["params"], params, meta["checkpoint"])
        volume, affine = read_volume(input_path, study=study, key=key, index=index)
        t0 = time.perf_counter()
        out = denoise_volume(model, {"params": params, "batch_stats": batch_stats}, volume,
                             scale=scale, batch_slices=batch_slices, name=str(input_path))
        seconds = time.perf_counter() - t0
        write_volume(output_path, out, affine=affine, attrs={
            "checkpoint": meta["checkpoint"], "input": str(input_path), "study": study,
            "key": key, "index": index})
    return {"output": str(output_path), "slices": int(out.shape[0]), "seconds": seconds,
            "checkpoint": meta["checkpoint"]}


def write_volume(path: str | Path, volume: np.ndarray, *, affine: Any = None,
                 attrs: Mapping[str, Any] | None = None) -> Path:
    """Writes ``(Z, H, W)`` atomically: NIfTI (by extension) or HDF5 dataset ``denoised``.

    The folder must exist (:func:`~tgd_jax.io.workdir.check_output_file` made it before
    the run): one that vanished meanwhile is a :class:`~tgd_jax.io.errors.RunError`.
    """
    path = Path(path)
    nifti = path.name.endswith((".nii", ".nii.gz"))
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii" if nifti else ".h5"
    with atomic_path(path, suffix=suffix, make_parent=False) as tmp:
        if nifti:
            nib = _nibabel()
            affine = np.eye(4) if affine is None else affine
            nib.save(nib.Nifti1Image(np.asarray(volume, np.float32).transpose(2, 1, 0),
                                     affine), tmp)
        else:
            write_h5(tmp, {"denoised": volume}, attrs)
    return path


def write_h5(path: str | Path, arrays: Mapping[str, np.ndarray],
             attrs: Mapping[str, Any] | None = None) -> None:
    """float32 gzip datasets plus scalar/str attributes (others stored as ``str``)."""
    import h5py

    with h5py.File(path, "w") as f:
        for name, array in arrays.items():
            f.create_dataset(name, data=np.asarray(array, np.float32), compression="gzip")
        for k, v in (attrs or {}).items():
            f.attrs[k] = v if isinstance(v, int | float | str) else str(v)


def _nibabel() -> Any:
    try:
        import nibabel
    except ImportError:
        raise UsageError("NIfTI input/output needs nibabel, which is not installed: "
                         "pip install 'tgd-jax[nifti]'") from None
    return nibabel
