"""Procedural whole-body FDG phantoms: activity (SUV), 511 keV attenuation and ROI masks.

A study is a stack of axial slices sampled from smooth 3D shapes (ellipsoids, elliptic
cylinders, spheres, tubes), so consecutive slices are anatomically continuous. Shapes are
evaluated on a fine in-plane grid (2 mm by default), finer than the reconstruction grid.
Every random choice comes from the explicit PRNG key: one key reproduces a study exactly.

Coordinates are millimetres: x left-right, y anterior-posterior, z along the body (the
torso spans z = 0 (pelvis) .. 420 (upper chest)).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tgd_jax.errors import UsageError

__all__ = ["Grid", "Phantom", "make_phantom", "MU_WATER", "SUV_RANGES", "RECIPES",
           "LESION_SETS", "GRADED_LESIONS", "GRADED_CONTRAST", "HEADLINE_LESION"]

#: What a study holds: ``sparse`` (the original recipe) or ``oncology``.
RECIPES = ("sparse", "oncology")

#: Lesions inserted for the test metrics: ``single`` (one 8-10 mm liver lesion, the original
#: test) or ``graded`` (that one plus :data:`GRADED_LESIONS`).
LESION_SETS = ("single", "graded")

#: The graded test lesions: organ -> sphere diameters (mm). The liver holds NEMA NU 2's hot
#: sphere sizes (10, 13, 17, 22 mm) and a 6 mm one below them; ``soft`` (muscle, a warm
#: uniform background outside the organs) the NEMA sizes. docs/simulator.md, section 7.
GRADED_LESIONS: dict[str, tuple[float, ...]] = {
    "liver": (6.0, 10.0, 13.0, 17.0, 22.0),
    "soft": (10.0, 13.0, 17.0, 22.0),
}
#: Lesion-to-background activity ratio of the graded lesions (NEMA NU 2's 4:1).
GRADED_CONTRAST = 4.0
#: The lesion Table 1 is headlined on, chosen before any network was measured on it
#: (docs/simulator.md, section 7): the smallest NEMA sphere above twice the image resolution.
HEADLINE_LESION = "lesion_liver_13mm"

#: 511 keV linear attenuation coefficients, 1/mm.
MU_WATER, MU_FAT, MU_LUNG, MU_SPONGY, MU_CORTICAL = 0.0096, 0.0090, 0.0030, 0.0120, 0.0160

#: Typical FDG SUV ranges (docs/simulator.md).
SUV_RANGES: dict[str, tuple[float, float]] = {
    "liver": (1.8, 2.6), "spleen": (1.6, 2.2), "blood": (1.5, 2.0), "lung": (0.3, 0.6),
    "muscle": (0.5, 1.0), "fat": (0.3, 0.3), "marrow": (1.5, 2.5), "cortical": (0.3, 0.3),
    "kidney": (2.5, 4.0), "myocardium": (1.5, 8.0), "lesion": (3.0, 15.0),
    "bladder": (40.0, 60.0), "catheter": (20.0, 40.0),
}


@dataclasses.dataclass(frozen=True)
class Grid:
    """An axial image grid: ``n x n`` pixels of ``pixel_mm``, ``n_slices`` of ``slice_mm``."""

    n: int = 256
    pixel_mm: float = 2.0
    n_slices: int = 16
    slice_mm: float = 4.0

    def axis(self) -> np.ndarray:
        """Pixel-centre coordinates (mm) along x or y, centred on 0."""
        return (np.arange(self.n) - (self.n - 1) / 2) * self.pixel_mm


@dataclasses.dataclass
class Phantom:
    """Truth of one study on a :class:`Grid`.

    Attributes:
      activity: ``(n_slices, n, n)`` float32 SUV.
      mu: ``(n_slices, n, n)`` float32 attenuation, 1/mm.
      rois: name -> ``(n_slices, n, n)`` bool: ``body``, ``liver`` (the whole organ),
        ``liver_voi`` (an interior region for noise measurements, lesion-free),
        ``lesion_<i>``, and for OOD studies ``bladder`` and ``catheter``.
      attrs: scalar description (BMI class, z of the first slice, lesion sizes and SUVs...).
    """

    activity: np.ndarray
    mu: np.ndarray
    rois: dict[str, np.ndarray]
    attrs: dict[str, Any]


def _uniform(key: jax.Array, lo: float, hi: float) -> float:
    return float(jax.random.uniform(key, minval=lo, maxval=hi))


def _ellipsoid(x, y, z, centre, axes) -> jax.Array:
    """Inside test of an axis-aligned ellipsoid (x, y, z broadcast)."""
    (cx, cy, cz), (ax, ay, az) = centre, axes
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0


def _cylinder(x, y, centre, axes) -> jax.Array:
    (cx, cy), (ax, ay) = centre, axes
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def make_phantom(
    key: jax.Array,
    grid: Grid,
    *,
    bmi: str = "low",
    n_lesions: int | None = None,
    liver_lesion: bool = False,
    ood: bool = False,
    z_start: float | None = None,
    recipe: str = "sparse",
    lesion_set: str = "single",
) -> Phantom:
    """A random torso phantom.

    Args:
      key: PRNG key; the only source of randomness.
      grid: the fine truth grid.
      bmi: ``"low"`` (< 23: smaller body, thin fat rim) or ``"high"`` (> 28: larger body,
        thick fat rim: more attenuation, fewer counts, noisier images).
      n_lesions: number of lesions (0-3 at random if None).
      liver_lesion: make the first lesion (adding one if needed) an 8-10 mm liver lesion in
        the central slice (for the lesion metrics).
      ood: add out-of-distribution features: a very hot bladder-like ellipsoid and a thin
        hot catheter-like tube (never in training sets). They are placed in the slab (with
        the liver, for the noise VOI) rather than in the pelvis: what matters is that the
        network has never seen such intensities and shapes.
      z_start: z (mm) of the first slice; random over the liver/heart region if None.
      recipe: ``"sparse"`` (0-3 lesions of 6-25 mm) or ``"oncology"``: what oncology FDG
        studies hold (:data:`RECIPES`): 3-8 lesions of 4-20 mm at 1.5-6 times their
        organ's uptake in the liver, lungs, lymph-node stations and bone, plus small hot
        structures that are not lesions (2-6 lymph nodes, the ureters with hot urine,
        1-3 bowel loops). All of them are in the ``hot`` ROI.
      lesion_set: ``"single"`` or ``"graded"``: also insert :data:`GRADED_LESIONS` (spheres at
        :data:`GRADED_CONTRAST` times their organ's uptake, each wholly inside its organ and
        10 mm from every other lesion, preferably outside the liver VOI; one with no room,
        e.g. wider than the slab, is left out and named in ``attrs["graded_missing"]``),
        each with its ROI
        ``lesion_<organ>_<d>mm`` and a background shell ``bg_<organ>_<d>mm`` (4-12 mm
        around it, same organ, clear of other lesions). Drawn from their own stream, so
        everything else in the study is as with ``"single"``.
    """
    if bmi not in ("low", "high"):
        raise UsageError(f"bmi must be 'low' or 'high', got {bmi!r}")
    if recipe not in RECIPES:
        raise UsageError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if lesion_set not in LESION_SETS:
        raise UsageError(f"lesion_set must be one of {LESION_SETS}, got {lesion_set!r}")
    graded_key = jax.random.fold_in(key, 0x6AD)  # its own stream: other draws unchanged
    keys = iter(jax.random.split(key, 64))
    u = lambda lo, hi: _uniform(next(keys), lo, hi)  # noqa: E731
    suv = {name: u(*SUV_RANGES[name]) for name in SUV_RANGES}
    if bmi == "low":
        a, b, fat = u(150, 190), u(100, 125), u(8, 14)
        bmi_value = u(18.5, 22.9)
    else:
        a, b, fat = u(195, 235), u(135, 165), u(25, 40)
        bmi_value = u(28.1, 36.0)
    depth = grid.n_slices * grid.slice_mm
    liver_cz = 205 + u(-10, 10)
    if z_start is None:  # a slab through the liver (for its VOI), often reaching the heart
        z_start = liver_cz - depth / 2 + u(-0.25, 0.5) * min(depth, 120.0)
    z = z_start + (np.arange(grid.n_slices) + 0.5) * grid.slice_mm
    ax = jnp.asarray(grid.axis())
    zz, yy, xx = jnp.meshgrid(jnp.asarray(z), ax, ax, indexing="ij")

    # Body: an elliptic cylinder whose size varies slowly with z (anatomical continuity).
    taper = 1.0 + 0.06 * jnp.cos(zz / 420.0 * jnp.pi)
    body = _cylinder(xx, yy, (0, 0), (a * taper, b * taper))
    inner = _cylinder(xx, yy, (0, 0), (a * taper - fat, b * taper - fat))
    activity = jnp.where(body, suv["fat"], 0.0)
    mu = jnp.where(body, MU_FAT, 0.0)
    activity = jnp.where(inner, suv["muscle"], activity)
    mu = jnp.where(inner, MU_WATER, mu)

    def paint(mask, value, mu_value=MU_WATER):
        nonlocal activity, mu
        mask = mask & inner
        activity = jnp.where(mask, value, activity)
        mu = jnp.where(mask, mu_value, mu)

    bi, ai = b - fat, a - fat  # inner half-axes
    for side in (-1, 1):  # lungs
        paint(_ellipsoid(xx, yy, zz, (side * 0.45 * ai, -0.1 * bi, 340), (0.38 * ai, 0.62 * bi,
                                                                          110)),
              suv["lung"], MU_LUNG)
    heart_c = (0.15 * ai + u(-10, 10), -0.35 * bi, 275 + u(-10, 10))
    paint(_ellipsoid(xx, yy, zz, heart_c, (52, 46, 48)), suv["myocardium"])
    paint(_ellipsoid(xx, yy, zz, heart_c, (40, 34, 36)), suv["blood"])
    liver_c = (-0.38 * ai + u(-8, 8), 0.05 * bi, liver_cz)
    liver_axes = (0.5 * ai, 0.72 * bi, 75)
    liver = _ellipsoid(xx, yy, zz, liver_c, liver_axes) & inner
    paint(liver, suv["liver"])
    paint(_ellipsoid(xx, yy, zz, (0.52 * ai, 0.3 * bi, 200), (35, 45, 50)), suv["spleen"])
    for side in (-1, 1):  # kidneys: cortex shell around a colder medulla
        centre = (side * 0.36 * ai, 0.5 * bi, 140 + u(-8, 8))
        paint(_ellipsoid(xx, yy, zz, centre, (28, 34, 55)), suv["kidney"])
        paint(_ellipsoid(xx, yy, zz, centre, (16, 20, 40)), 0.5 * suv["kidney"])
    paint(_cylinder(xx, yy, (-22, 0.42 * bi), (12, 12)), suv["blood"])  # aorta
    spine_c = (0.0, 0.68 * bi)
    paint(_cylinder(xx, yy, spine_c, (20, 18)), suv["cortical"], MU_CORTICAL)
    paint(_cylinder(xx, yy, spine_c, (16, 14)), suv["marrow"], MU_SPONGY)

    rois: dict[str, Any] = {"body": body, "liver": liver}
    # The liver VOI: a concentric, smaller ellipsoid, away from the organ's edges.
    liver_voi = _ellipsoid(xx, yy, zz, liver_c, tuple(0.6 * v for v in liver_axes)) & inner

    lesions = []
    hot = jnp.zeros_like(body)
    if recipe == "oncology":  # its own stream: the sparse recipe's draws stay as they were
        okeys = iter(jax.random.split(next(keys), 256))
        ou = lambda lo, hi: _uniform(next(okeys), lo, hi)  # noqa: E731
        organs = {"liver": (liver_c, liver_axes, suv["liver"]),
                  "lung": ((-0.45 * ai, -0.1 * bi, 340), (0.3 * ai, 0.5 * bi, 90),
                           suv["lung"]),
                  "node": ((0.0, 0.1 * bi, liver_cz + 30), (0.45 * ai, 0.35 * bi, 90),
                           suv["muscle"]),
                  "bone": ((spine_c[0], spine_c[1], liver_cz), (14, 12, 120), suv["marrow"])}
        names, weights = list(organs), np.array([0.35, 0.25, 0.25, 0.15])
        for _ in range(int(jax.random.randint(next(okeys), (), 3, 9))):
            choice = names[int(jax.random.choice(next(okeys), len(names), p=weights))]
            (cx, cy, cz), (sx, sy, sz), background = organs[choice]
            if choice == "lung":
                cx *= 1 if ou(0, 1) < 0.5 else -1
            diameter = float(np.exp(ou(np.log(4.0), np.log(20.0))))
            centre = (cx + ou(-0.7, 0.7) * sx, cy + ou(-0.7, 0.7) * sy,
                      float(np.clip(cz + ou(-0.7, 0.7) * sz, z[0], z[-1])))
            value = float(background) * float(np.exp(ou(np.log(1.5), np.log(6.0))))
            r = diameter / 2
            mask = _ellipsoid(xx, yy, zz, centre, (r, r, r)) & inner
            paint(mask, value)
            hot = hot | mask
            lesions.append({"diameter_mm": diameter, "centre_mm": centre, "organ": choice,
                            "suv": value})
        for _ in range(int(jax.random.randint(next(okeys), (), 2, 7))):  # lymph nodes
            r = ou(2.0, 4.0)
            centre = (ou(-0.35, 0.35) * ai, ou(-0.2, 0.45) * bi, ou(z[0], z[-1]))
            mask = _ellipsoid(xx, yy, zz, centre, (r, r, 1.3 * r)) & inner
            paint(mask, ou(2.0, 4.5))
            hot = hot | mask
        urine = ou(4.0, 12.0)
        for side in (-1, 1):  # ureters: thin vertical tubes of hot urine (hot dots in-plane)
            r = ou(1.5, 2.5)
            tube = _cylinder(xx, yy, (side * 0.22 * ai + ou(-6, 6), 0.42 * bi), (r, r))
            tube = tube & (zz < liver_cz + ou(0, 30)) & inner  # from below up to the hilum
            paint(tube, urine)
            hot = hot | tube
        for _ in range(int(jax.random.randint(next(okeys), (), 1, 4))):  # bowel loops
            centre = (ou(-0.4, 0.4) * ai, ou(-0.6, -0.1) * bi, ou(z[0], z[-1]))
            radius, thickness = ou(12, 25), ou(3.0, 5.0)
            dist = jnp.sqrt((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2)
            ring = (jnp.abs(dist - radius) <= thickness / 2) & (jnp.abs(zz - centre[2]) <= 12)
            ring = ring & (xx - centre[0] >= ou(-radius, 0)) & inner  # an open arc
            paint(ring, ou(1.5, 3.5))
            hot = hot | ring
        rois["hot"] = hot
        # the noise VOI stays clear of every hot structure (10 mm margin, as for lesions)
        near = _ellipsoid(xx, yy, zz, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)) & False
        for entry in lesions:
            r = entry["diameter_mm"] / 2 + 10
            near = near | _ellipsoid(xx, yy, zz, entry["centre_mm"], (r, r, r))
        liver_voi = liver_voi & ~near & ~hot
    count = int(jax.random.randint(next(keys), (), 0, 4)) if n_lesions is None else n_lesions
    if recipe == "oncology" and n_lesions is None:
        count = 0  # the lesions above replace the sparse ones
    if liver_lesion:
        count = max(count, 1)
    for i in range(count):
        zc = float(z[len(z) // 2]) + u(-0.3, 0.3) * depth
        value = u(*SUV_RANGES["lesion"])
        if liver_lesion and i == 0:
            diameter, value = u(8.0, 10.0), u(6.0, 10.0)
            centre = (liver_c[0] + u(-0.25, 0.25) * liver_axes[0],
                      liver_c[1] + u(-0.25, 0.25) * liver_axes[1], float(z[len(z) // 2]))
        else:
            diameter = u(6.0, 25.0)
            centre = (u(-0.6, 0.6) * ai, u(-0.6, 0.6) * bi, zc)
        r = diameter / 2
        mask = _ellipsoid(xx, yy, zz, centre, (r, r, r)) & inner
        paint(mask, value)
        rois[f"lesion_{i}"] = mask
        liver_voi = liver_voi & ~_ellipsoid(xx, yy, zz, centre, (r + 10, r + 10, r + 10))
        lesions.append({"diameter_mm": diameter, "centre_mm": centre,
                        "suv": float(activity[mask].mean()) if bool(mask.any()) else 0.0})
    if lesion_set == "graded":
        muscle = np.asarray(inner & (activity == suv["muscle"]))
        regions = {"liver": (np.asarray(liver), float(suv["liver"])),
                   "soft": (muscle, float(suv["muscle"]))}
        placed = _graded_lesions(graded_key, grid, np.asarray(z), regions, lesions,
                                 np.asarray(liver_voi))
        for entry, mask, shell in placed:
            paint(jnp.asarray(mask), entry["suv"])
            rois[entry["roi"]] = jnp.asarray(mask)
            rois["bg" + entry["roi"][len("lesion"):]] = jnp.asarray(shell)
            r = entry["diameter_mm"] / 2 + 10
            liver_voi = liver_voi & ~_ellipsoid(xx, yy, zz, entry["centre_mm"], (r, r, r))
            lesions.append(entry)
        missing = sorted({f"lesion_{o}_{d:g}mm" for o, sizes in GRADED_LESIONS.items()
                          for d in sizes} - {e["roi"] for e, _, _ in placed})
    rois["liver_voi"] = liver_voi

    if ood:
        bladder_c = (u(-20, 20), 0.1 * bi, z_start + u(0.1, 0.3) * depth)
        bladder = _ellipsoid(xx, yy, zz, bladder_c, (40, 32, 30)) & inner
        paint(bladder, suv["bladder"])
        # A catheter: a 4-6 mm wide tube running obliquely in the axial plane.
        width = u(4.0, 6.0)
        p0 = jnp.array([bladder_c[0] + 30, bladder_c[1] - 20])
        p1 = jnp.array([u(0.3, 0.6) * ai, -0.7 * bi])
        d = (p1 - p0) / jnp.linalg.norm(p1 - p0)
        rel_x, rel_y = xx - p0[0], yy - p0[1]
        along = rel_x * d[0] + rel_y * d[1]
        across = jnp.abs(rel_x * d[1] - rel_y * d[0])
        zc = bladder_c[2] + 0.3 * depth
        tube = (across <= width / 2) & (along >= 0) & (along <= jnp.linalg.norm(p1 - p0))
        tube = tube & (jnp.abs(zz - zc) <= 0.2 * depth) & inner
        paint(tube, suv["catheter"])
        rois["bladder"], rois["catheter"] = bladder, tube
        rois["liver_voi"] = rois["liver_voi"] & ~bladder & ~tube

    attrs = {
        "bmi_class": bmi, "bmi": bmi_value, "body_axes_mm": (a, b), "fat_mm": fat,
        "z_start_mm": z_start, "lesions": lesions, "ood": ood, "suv": suv, "recipe": recipe,
        "lesion_set": lesion_set,
    }
    if lesion_set == "graded":
        attrs["graded_missing"] = missing
    return Phantom(
        activity=np.asarray(activity, np.float32),
        mu=np.asarray(mu, np.float32),
        rois={k: np.asarray(v, bool) for k, v in rois.items()},
        attrs=attrs,
    )


def _graded_lesions(key: jax.Array, grid: Grid, z: np.ndarray,
                    regions: dict[str, tuple[np.ndarray, float]],
                    existing: list[dict[str, Any]], voi: np.ndarray
                    ) -> list[tuple[dict[str, Any], np.ndarray, np.ndarray]]:
    """Places :data:`GRADED_LESIONS` (largest first): ``[(attrs, mask, shell), ...]``; a
    lesion with no room (a slab thinner than its diameter) is left out.

    A centre is drawn uniformly among the voxels of its organ (``regions``: organ ->
    ``((Z, n, n) mask, background SUV)``) where the sphere lies inside the organ with 2 mm to
    spare and inside the slab, 10 mm clear of every lesion already there; centres whose
    sphere keeps 10 mm from the liver VOI ``voi`` are preferred (the VOI measures noise).
    """
    from scipy import ndimage

    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    ax = grid.axis()
    zz, yy, xx = np.meshgrid(z, ax, ax, indexing="ij")
    centres = [(tuple(e["centre_mm"]), e["diameter_mm"] / 2) for e in existing]
    sampling = (grid.slice_mm, grid.pixel_mm, grid.pixel_mm)
    voi_dist = ndimage.distance_transform_edt(~voi, sampling=sampling)
    todo = sorted(((organ, d) for organ, sizes in GRADED_LESIONS.items() for d in sizes),
                  key=lambda item: -item[1])
    placed = []
    for organ, diameter in todo:
        region, background = regions[organ]
        r = diameter / 2
        ok = ndimage.distance_transform_edt(region, sampling=sampling) >= r + 2.0
        ok &= (zz - z[0] >= r - grid.slice_mm / 2) & (z[-1] - zz >= r - grid.slice_mm / 2)
        for c, rc in centres:
            ok &= (xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2 >= (r + rc + 10) ** 2
        if not ok.any():  # e.g. a slab thinner than the sphere (the test suite's 4 slices)
            continue
        clear = ok & (voi_dist >= r + 10)
        candidates = np.flatnonzero(clear if clear.any() else ok)
        i = np.unravel_index(candidates[rng.integers(len(candidates))], ok.shape)
        centre = (float(xx[i]), float(yy[i]), float(zz[i]))
        d2 = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (zz - centre[2]) ** 2
        mask = d2 <= r * r
        centres.append((centre, r))
        name = f"lesion_{organ}_{diameter:g}mm"
        placed.append(({"diameter_mm": diameter, "centre_mm": centre, "organ": organ,
                        "suv": GRADED_CONTRAST * background, "background_suv": background,
                        "roi": name}, mask, (d2 >= (r + 4) ** 2) & (d2 <= (r + 12) ** 2)
                       & region))
    # a shell never holds another lesion (nor the 4 mm around it)
    for _, _, shell in placed:
        for c, rc in centres:
            shell &= (xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2 > (rc + 4) ** 2
    return placed
