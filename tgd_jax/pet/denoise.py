"""Denoising whole 3D volumes with a trained 2.5D network.

Each slice ``z`` is denoised from the stack ``(z-1, z, z+1)``; the network's output for the
centre slice is kept. Edge slices use a mirrored neighbour (``z = -1`` reads slice 1), which
keeps the noise of the stack independent, unlike repeating the edge slice itself.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tgd_jax.pet.models import model_from_config
from tgd_jax.train.errors import UsageError
from tgd_jax.train.workdir import atomic_path, check_output_file

__all__ = ["slice_stacks", "denoise_volume", "denoise_file",
           "read_volume", "write_volume"]


def slice_stacks(volume: np.ndarray) -> np.ndarray:
    """``(Z, H, W) -> (Z, H, W, 3)``: each slice with its neighbours, mirrored at the ends."""
    volume = np.asarray(volume, np.float32)
    if volume.ndim != 3 or volume.shape[0] < 2:
        raise ValueError(f"expected a (Z >= 2, H, W) volume, got shape {volume.shape}")
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
    """A ``(Z, H, W)`` volume from HDF5 (``study``/``key``) or NIfTI (``.nii``/``.nii.gz``).

    A 4D HDF5 key (``(R, Z, H, W)`` realisations) gives volume ``index``.

    Returns the volume and what is needed to write a result alike (the NIfTI affine, or
    None). NIfTI volumes are stored (X, Y, Z) and are transposed to (Z, Y, X).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.name.endswith((".nii", ".nii.gz")):
        nib = _nibabel()
        try:
            image = nib.load(str(path))
            data = np.asarray(image.get_fdata(dtype=np.float32))
        except Exception as e:  # noqa: BLE001 - nibabel raises many kinds for bad bytes
            raise UsageError(f"{path}: not a readable NIfTI image ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if data.ndim != 3:
            raise ValueError(f"{path}: expected a 3D NIfTI image, got shape {data.shape}")
        return np.ascontiguousarray(data.transpose(2, 1, 0)), image.affine
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UsageError(f"{path}: not a readable HDF5 file ({e}); NIfTI inputs must end in "
                         ".nii or .nii.gz") from None
    with f:
        if not study or not key:
            raise ValueError(f"{path}: HDF5 input needs --study and --key (studies: "
                             f"{sorted(f)})")
        if study not in f:
            raise KeyError(f"{path}: no study '{study}' (have {sorted(f)})")
        if key not in f[study]:
            raise KeyError(f"{path}: study '{study}' has no key '{key}'")
        d = f[study][key]
        if d.ndim == 4:
            if not 0 <= index < d.shape[0]:
                raise ValueError(f"{path}: '{study}/{key}' holds {d.shape[0]} volumes; "
                                 f"index {index} is out of range")
            data = np.asarray(d[index], np.float32)
        else:
            data = np.asarray(d[()], np.float32)
    if data.ndim != 3:
        raise ValueError(f"{path}: '{study}/{key}' has shape {data.shape}, expected (Z, H, W)")
    return data, None


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
    check_output_file(output_path, inputs=[input_path], overwrite=overwrite)
    params, batch_stats, config, meta = checkpoints.restore(checkpoint, which)
    model = model_from_config(config.model)
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    checkpoints.check_tree_match(template["params"], params, meta["checkpoint"])
    volume, affine = read_volume(input_path, study=study, key=key, index=index)
    t0 = time.perf_counter()
    out = denoise_volume(model, {"params": params, "batch_stats": batch_stats}, volume,
                         scale=float(config.data.intensity_scale), batch_slices=batch_slices,
                         name=str(input_path))
    seconds = time.perf_counter() - t0
    write_volume(output_path, out, affine=affine, attrs={
        "checkpoint": meta["checkpoint"], "input": str(input_path), "study": study,
        "key": key, "index": index})
    return {"output": str(output_path), "slices": int(out.shape[0]), "seconds": seconds,
            "checkpoint": meta["checkpoint"]}


def write_volume(path: str | Path, volume: np.ndarray, *, affine: Any = None,
                 attrs: Mapping[str, Any] | None = None) -> Path:
    """Writes ``(Z, H, W)`` atomically: NIfTI (by extension) or HDF5 dataset ``denoised``."""
    path = Path(path)
    nifti = path.name.endswith((".nii", ".nii.gz"))
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii" if nifti else ".h5"
    with atomic_path(path, suffix=suffix) as tmp:
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
        raise ImportError("NIfTI input/output needs nibabel: pip install 'tgd-jax[nifti]'"
                          ) from None
    return nibabel
