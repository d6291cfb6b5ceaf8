"""Training pairs from the simulator's HDF5 datasets, and stateless 2.5D patch batches.

A :class:`PairSet` is a list of 3D volumes plus ``(input, target)`` index pairs into it:

* supervised, noise-adaptive (``train.py``, ``finetune.py``): each count level's input of a
  study paired with that study's 600 s target of the same reconstruction version;
* noise-2-noise (``online.py``): half A -> half B and half B -> half A of one study.

:func:`sample_batch` draws a batch as a pure function of ``(seed, step)`` (NumPy's
``SeedSequence``), so a resumed run sees exactly the batches an uninterrupted one would
(:func:`tgd_jax.train.trainer.fit` samples them ahead on a background thread).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tgd_jax.errors import UsageError
from tgd_jax.io import readers
from tgd_jax.pet.dataset import DatasetError, DatasetInfo, level_key, open_dataset

__all__ = ["PairSet", "supervised_pairs", "n2n_pairs", "sample_batch", "steps_per_epoch",
           "split_studies", "hot_voxels", "STREAM_TRAIN", "STREAM_VAL",
           "TARGETS"]

#: Random streams of the patch sampler: training batches, and fixed validation batches.
STREAM_TRAIN, STREAM_VAL = 0, 1
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PairSet:
    """Volumes and the (input, target) pairs drawn from them.

    Attributes:
      volumes: tuple of ``(Z, H, W)`` float32 arrays.
      pairs: ``(P, 2)`` int array of ``(input volume, target volume)`` indices.
      names: one ``"study/key"`` per volume, for messages and provenance.
    """

    volumes: tuple[np.ndarray, ...]
    pairs: np.ndarray
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.pairs) == 0:
            raise UsageError("a PairSet needs at least one (input, target) pair")
        for i, j in self.pairs:
            a, b = self.volumes[i], self.volumes[j]
            if a.shape != b.shape:
                raise UsageError(f"pair {self.names[i]} -> {self.names[j]}: shapes "
                                 f"{a.shape} and {b.shape} differ")
            if a.ndim != 3 or a.shape[0] < 3:
                raise UsageError(f"{self.names[i]}: 2.5D training needs (Z >= 3, H, W) "
                                 f"volumes, got shape {a.shape}")

    def check_patch(self, patch_size: int) -> None:
        """Raises :class:`DatasetError`, naming the volume, if a ``patch_size`` square does
        not fit in every pair (studies may differ in size: each is sampled within its own)."""
        for i, _ in self.pairs:
            z, h, w = self.volumes[i].shape
            if patch_size > min(h, w):
                raise DatasetError(f"{self.names[i]}: its {h} x {w} slices are smaller than "
                                   f"data.patch_size {patch_size}")


def split_studies(studies: Sequence[str], val_studies: int) -> tuple[list[str], list[str]]:
    """The last ``val_studies`` studies validate, the others train."""
    studies = list(studies)
    if not 0 <= val_studies < max(1, len(studies)):
        raise UsageError(f"val_studies={val_studies} must be in [0, {len(studies) - 1}] for "
                         f"a dataset of {len(studies)} studies")
    if val_studies == 0:
        return studies, []
    return studies[:-val_studies], studies[-val_studies:]


#: What a supervised pair's target can be: the 600 s/bed image (what a scanner gives), or
#: the simulator's reconstruction of the expected data (``<v>/noiseless``: a ceiling).
TARGETS = ("target", "noiseless")


def supervised_pairs(path: str | Path, version: str, studies: Sequence[str] | None = None,
                     *, scale: float = 1.0, info: DatasetInfo | None = None,
                     target: str = "target") -> PairSet:
    """Every count level's input -> the study's ``target`` image, same ``version``.

    ``info``: the file's :func:`open_dataset` result, if already validated (skips reading
    the whole file again). ``target``: one of :data:`TARGETS`; ``"noiseless"`` needs a
    file simulated with it (``python -m tgd_jax.sim --noiseless``).

    Raises:
      DatasetError: the file is invalid, has no inputs, or lacks ``version`` or the target.
    """
    if target not in TARGETS:
        raise UsageError(f"data.target must be one of {TARGETS}, got {target!r}")
    info = info or open_dataset(path)
    if version not in info.versions:
        raise DatasetError(f"{path}: no reconstruction version '{version}' "
                           f"(the file has {list(info.versions)})")
    if not info.levels_s:
        raise DatasetError(f"{path}: role '{info.role}' has no count-level inputs; supervised "
                           "training needs a 'train' or 'finetune' dataset")
    volumes: list[np.ndarray] = []
    names: list[str] = []
    pairs: list[tuple[int, int]] = []
    with h5py.File(path, "r") as f:
        for study in _select(path, info.studies, studies):
            if f"{version}/{target}" not in f[study]:
                raise DatasetError(f"{path}: study '{study}': no key '{version}/{target}'"
                                   + (" (simulate the file with --noiseless)"
                                      if target == "noiseless" else ""))
            goal = len(volumes)
            volumes.append(_read(f, study, f"{version}/{target}", scale))
            names.append(f"{study}/{version}/{target}")
            for level in info.levels_s:
                key = f"{version}/{level_key(level)}"
                pairs.append((len(volumes), goal))
                volumes.append(_read(f, study, key, scale))
                names.append(f"{study}/{key}")
    return PairSet(tuple(volumes), np.asarray(pairs, np.int64), tuple(names))


def n2n_pairs(path: str | Path, version: str, study: str = "", *,
              scale: float = 1.0, info: DatasetInfo | None = None) -> PairSet:
    """Noise-2-noise pairs of ONE study: half a -> half b and b -> a (``info`` as in
    :func:`supervised_pairs`)."""
    info = info or open_dataset(path)
    if version not in info.versions:
        raise DatasetError(f"{path}: no reconstruction version '{version}' "
                           f"(the file has {list(info.versions)})")
    study = study or info.studies[0]
    (study,) = _select(path, info.studies, [study])
    with h5py.File(path, "r") as f:
        for key in ("halves/a", "halves/b"):
            if f"{version}/{key}" not in f[study]:
                raise DatasetError(f"{path}: study '{study}': missing key '{version}/{key}' "
                                   "(noise-2-noise needs an 'online' dataset)")
        a = _read(f, study, f"{version}/halves/a", scale)
        b = _read(f, study, f"{version}/halves/b", scale)
    return PairSet((a, b), np.asarray([(0, 1), (1, 0)]),
                   (f"{study}/{version}/halves/a", f"{study}/{version}/halves/b"))


def _select(path: Any, available: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    if wanted is None:
        return list(available)
    missing = [s for s in wanted if s not in available]
    if missing:
        raise DatasetError(f"{path}: no study {missing[0]!r} (have {list(available)})")
    if not wanted:
        raise DatasetError(f"{path}: no studies selected")
    return list(wanted)


def _read(f: h5py.File, study: str, key: str, scale: float) -> np.ndarray:
    """One volume, scaled; a read that fails (the file changed since it was validated, a
    truncated chunk) is a :class:`DatasetError` naming it."""
    where = f"{f.filename}: study '{study}'"
    d = readers.h5_get(f[study], key, where, error=DatasetError)
    values = readers.read_array(d, f"{where}: key '{key}'", error=DatasetError)
    return values.astype(np.float32) * np.float32(scale)


def steps_per_epoch(pairs: PairSet, patch_size: int, batch_size: int) -> int:
    """Steps for one epoch: as many patches as tile every pair's 2.5D slices once."""
    patches = 0
    for i, _ in pairs.pairs:
        z, h, w = pairs.volumes[i].shape
        patches += (z - 2) * max(1, h // patch_size) * max(1, w // patch_size)
    return max(1, math.ceil(patches / batch_size))


def hot_voxels(pairs: PairSet, quantile: float = 0.99) -> tuple[np.ndarray, ...]:
    """Per pair, the ``(N, 3)`` int ``(z, y, x)`` of its target's hot voxels: those at or
    above the target volume's ``quantile``, on the centre slices ``1..Z-2`` a 2.5D patch
    can be centred on (the bladder, heart, kidneys, lesions and nodes of a PET image)."""
    per_volume: dict[int, np.ndarray] = {}
    for _, goal in pairs.pairs:
        if int(goal) not in per_volume:
            inner = pairs.volumes[goal][1:-1]
            zyx = np.argwhere(inner >= np.quantile(inner, quantile))
            per_volume[int(goal)] = zyx + np.array([1, 0, 0])
    return tuple(per_volume[int(goal)] for _, goal in pairs.pairs)


def sample_batch(pairs: PairSet, *, seed: int, step: int, batch_size: int, patch_size: int,
                 augment: bool = True, stream: int = STREAM_TRAIN,
                 rows: slice | None = None, hot: Sequence[np.ndarray] | None = None,
                 hot_fraction: float = 0.0) -> Batch:
    """A batch of random 2.5D patches, a pure function of ``(seed, step, stream)``.

    Each example: a pair, a centre slice ``z`` (1..Z-2, so its 3 slices exist), a
    ``patch_size`` square at a random position, and (``augment``) one of the 8 flips /
    90-degree rotations, applied to input and target alike. Pairs of different sizes are
    each sampled within their own extent (volumes of one size draw the positions as they
    always did).

    Args:
      batch_size: the GLOBAL batch: the random choices are drawn for all its rows.
      rows: the rows to make (one process's share, :func:`tgd_jax.train.parallel.process_rows`);
        None: all. The rows of several processes concatenated are exactly the batch one
        process makes alone, so the run does not depend on how many processes share it.
      hot, hot_fraction: oversampling of hot structures: each row is, with probability
        ``hot_fraction``, a patch holding a voxel drawn uniformly from its pair's ``hot``
        (:func:`hot_voxels`) at a uniform position within the patch. These draws come from
        a stream of their own, so ``hot_fraction=0`` gives the batches it always gave.

    Returns:
      ``{"inputs": (R, p, p, 3), "targets": (R, p, p, 3)}`` float32, slices as channels,
      ``R`` the number of rows made.
    """
    # The 4th entry keeps the stream of the batches single-process runs always drew.
    rng = np.random.default_rng([seed, step, stream, 0])
    pairs.check_patch(patch_size)
    dims = np.array([pairs.volumes[i].shape for i, _ in pairs.pairs])  # (P, 3)
    pick = rng.integers(len(pairs.pairs), size=batch_size)
    if (dims == dims[0]).all():  # one size: the draws every earlier run made
        z_max, h, w = dims[0, 0] - 2, dims[0, 1], dims[0, 2]
        zs = rng.integers(1, z_max + 1, size=batch_size)
        ys = rng.integers(0, h - patch_size + 1, size=batch_size)
        xs = rng.integers(0, w - patch_size + 1, size=batch_size)
    else:  # each row within its own pair's extent
        own = dims[pick]
        zs = 1 + (rng.random(batch_size) * (own[:, 0] - 2)).astype(int)
        ys = (rng.random(batch_size) * (own[:, 1] - patch_size + 1)).astype(int)
        xs = (rng.random(batch_size) * (own[:, 2] - patch_size + 1)).astype(int)
    if hot_fraction > 0:
        if hot is None:
            raise UsageError("sample_batch: hot_fraction > 0 needs hot (hot_voxels(pairs))")
        zs, ys, xs = _hot_rows(np.random.default_rng([seed, step, stream, 1]), pairs, hot,
                               hot_fraction, pick, dims, patch_size, (zs, ys, xs))
    rots = rng.integers(4, size=batch_size) if augment else np.zeros(batch_size, int)
    flips = rng.integers(2, size=batch_size) if augment else np.zeros(batch_size, int)
    made = range(batch_size)[rows if rows is not None else slice(None)]
    out = {name: np.empty((len(made), patch_size, patch_size, 3), np.float32)
           for name in ("inputs", "targets")}
    for i, b in enumerate(made):
        for name, vol in zip(("inputs", "targets"), pairs.pairs[pick[b]], strict=True):
            z, y, x = zs[b], ys[b], xs[b]
            patch = pairs.volumes[vol][z - 1:z + 2, y:y + patch_size, x:x + patch_size]
            patch = np.rot90(patch, rots[b], axes=(1, 2))
            if flips[b]:
                patch = patch[:, :, ::-1]
            out[name][i] = np.moveaxis(patch, 0, -1)
    return out


def _hot_rows(rng: np.random.Generator, pairs: PairSet, hot: Sequence[np.ndarray],
              fraction: float, pick: np.ndarray, dims: np.ndarray, p: int,
              zyx: tuple[np.ndarray, np.ndarray, np.ndarray]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``zyx`` with the rows drawn as hot (probability ``fraction``) moved onto a hot voxel."""
    zs, ys, xs = (np.array(a) for a in zyx)
    n = len(pick)
    chosen = rng.random(n) < fraction
    u, offset = rng.random(n), rng.integers(0, p, size=(n, 2))  # every row draws: rows of
    # several processes see the same numbers
    for b in np.flatnonzero(chosen):
        voxels = hot[pick[b]]
        if not len(voxels):
            continue
        z, y, x = voxels[int(u[b] * len(voxels))]
        _, h, w = dims[pick[b]]
        zs[b] = z
        ys[b] = np.clip(y - offset[b, 0], 0, h - p)
        xs[b] = np.clip(x - offset[b, 1], 0, w - p)
    return zs, ys, xs
