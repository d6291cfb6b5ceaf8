"""2D parallel-beam projectors: a matched system matrix for reconstruction, and a finer,
independent line-integral model for generating data.

* :class:`SystemMatrix` - the reconstruction's projector. Ray-driven with bilinear
  interpolation along each ray (step = one pixel), stored sparse in ELLPACK form twice:
  by ray for the forward projection and by pixel for the back projection. Both are gathers
  (fast on CPU and GPU) over the SAME weights, so the back projector is the exact adjoint
  (``<Px, y> = <x, P^T y>`` up to float32 summation order; tested). Views are stored
  subset by subset (interleaved), so OSEM reads a subset with one dynamic index.
* :func:`line_integrals` - the data model: several rays per detector bin on the fine truth
  grid, sampled by ``map_coordinates``; the reconstruction never uses it.

Units: millimetres; a line integral of ``mu`` in 1/mm is dimensionless.
Layout: images ``(B, n, n)`` (rows = y, columns = x), sinograms ``(B, n_views, n_bins)``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates

from tgd_jax.errors import UsageError

__all__ = ["SinogramGeometry", "SystemMatrix", "system_matrix", "line_integrals"]


@dataclasses.dataclass(frozen=True)
class SinogramGeometry:
    """Parallel-beam sinogram: ``n_views`` angles over [0, pi), ``n_bins`` bins of ``bin_mm``."""

    n_bins: int = 128
    bin_mm: float = 4.0
    n_views: int = 120

    def angles(self) -> np.ndarray:
        return np.arange(self.n_views) * np.pi / self.n_views

    def bin_centres(self) -> np.ndarray:
        return (np.arange(self.n_bins) - (self.n_bins - 1) / 2) * self.bin_mm


def _ray_points(n: int, pixel_mm: float, geom: SinogramGeometry, rays_per_bin: int,
                angles: np.ndarray):
    """Sample points (in pixel index units) of every ray: ``(V, n_bins, r, S)`` rows/cols."""
    sub = (np.arange(rays_per_bin) + 0.5) / rays_per_bin - 0.5
    s = geom.bin_centres()[:, None] + sub[None, :] * geom.bin_mm  # (n_bins, r)
    n_samples = int(np.ceil(n * np.sqrt(2.0))) + 1
    t = (np.arange(n_samples) - (n_samples - 1) / 2) * pixel_mm
    c = np.cos(angles)[:, None, None, None]
    si = np.sin(angles)[:, None, None, None]
    x = s[None, :, :, None] * c - t * si  # ray: s along (cos, sin), t along (-sin, cos)
    y = s[None, :, :, None] * si + t * c
    centre = (n - 1) / 2
    return y / pixel_mm + centre, x / pixel_mm + centre


def _ell(rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, n_rows: int):
    """COO (duplicates already summed) -> ELLPACK ``(n_rows, K)`` indices and weights."""
    order = np.argsort(rows, kind="stable")
    rows, cols, weights = rows[order], cols[order], weights[order]
    counts = np.bincount(rows, minlength=n_rows)
    width = max(1, int(counts.max()))
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(rows.size) - start[rows]
    index = np.zeros((n_rows, width), np.int32)
    value = np.zeros((n_rows, width), np.float32)
    index[rows, slot] = cols
    value[rows, slot] = weights
    return index, value


@dataclasses.dataclass(frozen=True)
class SystemMatrix:
    """Sparse projector for an ``n x n`` image of ``pixel_mm`` pixels, in ``n_subsets``.

    Attributes (device arrays; ``S`` subsets, ``Rs = views_per_subset * n_bins`` rays each):
      fwd_index, fwd_weight: ``(S, Rs, K)`` pixels and weights of each ray.
      back_index, back_weight: ``(S, n*n, Ks)`` rays (within the subset) of each pixel.
    """

    n: int
    pixel_mm: float
    geometry: SinogramGeometry
    n_subsets: int
    fwd_index: jax.Array
    fwd_weight: jax.Array
    back_index: jax.Array
    back_weight: jax.Array

    @property
    def views_per_subset(self) -> int:
        return self.geometry.n_views // self.n_subsets

    def subset_views(self, subset: int) -> np.ndarray:
        """View indices of a subset: interleaved, ``subset, subset + S, ...``."""
        return np.arange(subset, self.geometry.n_views, self.n_subsets)

    def forward_subset(self, images: jax.Array, subset: jax.Array | int) -> jax.Array:
        """``(B, n, n) -> (B, views_per_subset, n_bins)`` for one (possibly traced) subset."""
        b = images.shape[0]
        flat = images.reshape(b, -1).T  # (n*n, B): each gathered row is B contiguous values
        idx, w = self.fwd_index[subset], self.fwd_weight[subset]
        rays = jnp.einsum("rk,rkb->rb", w, flat[idx])
        return rays.T.reshape(b, self.views_per_subset, self.geometry.n_bins)

    def back_subset(self, sinos: jax.Array, subset: jax.Array | int) -> jax.Array:
        """Adjoint of :meth:`forward_subset`: ``(B, views_per_subset, n_bins) -> (B, n, n)``."""
        b = sinos.shape[0]
        flat = sinos.reshape(b, -1).T  # (Rs, B)
        idx, w = self.back_index[subset], self.back_weight[subset]
        pixels = jnp.einsum("pk,pkb->pb", w, flat[idx])
        return pixels.T.reshape(b, self.n, self.n)

    def forward(self, images: jax.Array) -> jax.Array:
        """Full sinogram ``(B, n_views, n_bins)`` (views in natural order)."""
        parts = [self.forward_subset(images, s) for s in range(self.n_subsets)]
        return self._interleave(jnp.stack(parts, axis=1))

    def back(self, sinos: jax.Array) -> jax.Array:
        """Adjoint of :meth:`forward`."""
        b = sinos.shape[0]
        v = self.views_per_subset
        by_subset = sinos.reshape(b, v, self.n_subsets, -1).transpose(0, 2, 1, 3)
        return sum(self.back_subset(by_subset[:, s], s) for s in range(self.n_subsets))

    def to_subsets(self, sinos: jax.Array) -> jax.Array:
        """``(B, n_views, n_bins) -> (B, S, views_per_subset, n_bins)``."""
        b, v = sinos.shape[0], self.views_per_subset
        return sinos.reshape(b, v, self.n_subsets, -1).transpose(0, 2, 1, 3)

    def _interleave(self, parts: jax.Array) -> jax.Array:
        b = parts.shape[0]  # (B, S, v, n_bins) -> (B, v * S, n_bins), view = j * S + s
        return parts.transpose(0, 2, 1, 3).reshape(b, self.geometry.n_views, -1)


jax.tree_util.register_dataclass(
    SystemMatrix,
    data_fields=["fwd_index", "fwd_weight", "back_index", "back_weight"],
    meta_fields=["n", "pixel_mm", "geometry", "n_subsets"],
)


@functools.lru_cache(maxsize=8)
def system_matrix(
    n: int, pixel_mm: float, geometry: SinogramGeometry, n_subsets: int = 1
) -> SystemMatrix:
    """Builds (and caches) the sparse projector. ``n_views`` must divide into subsets."""
    if geometry.n_views % n_subsets:
        raise UsageError(
            f"{geometry.n_views} views do not split into {n_subsets} equal subsets"
        )
    per = geometry.n_views // n_subsets
    rows_per_subset = per * geometry.n_bins
    fwd, back = [], []
    for s in range(n_subsets):
        views = np.arange(s, geometry.n_views, n_subsets)
        rr, cc = _ray_points(n, pixel_mm, geometry, 1, geometry.angles()[views])
        rr, cc = rr[:, :, 0], cc[:, :, 0]  # (per, n_bins, S)
        ray = np.broadcast_to(np.arange(rows_per_subset).reshape(per, -1, 1), rr.shape)
        r0, c0 = np.floor(rr).astype(np.int64), np.floor(cc).astype(np.int64)
        fr, fc = rr - r0, cc - c0
        coo_r, coo_c, coo_w = [], [], []
        for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (1, 0, fr * (1 - fc)),
                          (0, 1, (1 - fr) * fc), (1, 1, fr * fc)):
            r, c = r0 + dr, c0 + dc
            ok = (r >= 0) & (r < n) & (c >= 0) & (c < n) & (w > 0)
            coo_r.append(ray[ok])
            coo_c.append((r * n + c)[ok])
            coo_w.append(w[ok] * pixel_mm)
        key = np.concatenate(coo_r) * (n * n) + np.concatenate(coo_c)
        weight = np.concatenate(coo_w)
        unique, inverse = np.unique(key, return_inverse=True)
        summed = np.bincount(inverse, weights=weight)  # merge repeated (ray, pixel) pairs
        ray_idx, pix_idx = unique // (n * n), unique % (n * n)
        fwd.append(_ell(ray_idx, pix_idx, summed, rows_per_subset))
        back.append(_ell(pix_idx, ray_idx, summed, n * n))

    def stack(parts):
        width = max(p[0].shape[1] for p in parts)
        pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1])))  # noqa: E731
        return (jnp.asarray(np.stack([pad(p[0]) for p in parts])),
                jnp.asarray(np.stack([pad(p[1]) for p in parts])))

    fwd_index, fwd_weight = stack(fwd)
    back_index, back_weight = stack(back)
    return SystemMatrix(n, float(pixel_mm), geometry, n_subsets,
                        fwd_index, fwd_weight, back_index, back_weight)


@functools.lru_cache(maxsize=4)
def _data_rays(n: int, pixel_mm: float, geometry: SinogramGeometry, rays_per_bin: int):
    rows, cols = _ray_points(n, pixel_mm, geometry, rays_per_bin, geometry.angles())
    return jnp.asarray(rows, jnp.float32), jnp.asarray(cols, jnp.float32)


@jax.jit
def _sample_rays(images: jax.Array, rows: jax.Array, cols: jax.Array, step: float) -> jax.Array:
    def one(image: jax.Array) -> jax.Array:
        samples = map_coordinates(image, [rows, cols], order=1, mode="constant", cval=0.0)
        return samples.sum(-1).mean(-1) * step

    return jax.lax.map(one, images)


def line_integrals(
    images: jax.Array, *, pixel_mm: float, geometry: SinogramGeometry, rays_per_bin: int = 2
) -> jax.Array:
    """Data-model projection: ``(B, n, n) -> (B, n_views, n_bins)`` line integrals.

    Each bin averages ``rays_per_bin`` parallel rays, each sampled every ``pixel_mm`` with
    bilinear interpolation (zero outside the image).
    """
    rows, cols = _data_rays(images.shape[-1], float(pixel_mm), geometry, rays_per_bin)
    return _sample_rays(jnp.asarray(images, jnp.float32), rows, cols, float(pixel_mm))
