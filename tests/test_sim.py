"""The PET simulator: projector physics, exact count splitting, OSEM, reproducibility,
the v1/v2 differences, and the dataset reader's validation."""

from __future__ import annotations

import dataclasses

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgd_jax.pet import dataset
from tgd_jax.sim import acquisition, report
from tgd_jax.sim.phantom import MU_WATER
from tgd_jax.sim.projector import SinogramGeometry, line_integrals, system_matrix
from tgd_jax.sim.recon import VERSIONS, ReconSettings, osem
from tgd_jax.sim.study import SimConfig, Study, simulate_study, simulation_key

# Reconstructions and count splitting run for seconds: compiled fully optimised.
pytestmark = pytest.mark.usefixtures("optimized_xla")

SMALL = SinogramGeometry(n_bins=48, bin_mm=8.0, n_views=24)


@pytest.mark.parametrize("subsets", [1, 4])
def test_back_projector_is_the_adjoint(subsets):
    system = system_matrix(40, 8.0, SMALL, subsets)
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.uniform(kx, (3, 40, 40))
    y = jax.random.uniform(ky, (3, 24, 48))
    lhs, rhs = float(jnp.vdot(system.forward(x), y)), float(jnp.vdot(x, system.back(y)))
    assert abs(lhs - rhs) <= 1e-6 * abs(lhs)
    ys = system.to_subsets(y)
    for s in range(subsets):
        lhs = float(jnp.vdot(system.forward_subset(x, s), ys[:, s]))
        rhs = float(jnp.vdot(x, system.back_subset(ys[:, s], s)))
        assert abs(lhs - rhs) <= 1e-6 * abs(lhs)


def _disk(n: int, pixel: float, radius: float, sub: int = 8) -> np.ndarray:
    """Area-weighted uniform disk (value 1) on an n x n grid."""
    axis = (np.arange(n * sub) - (n * sub - 1) / 2) * pixel / sub
    inside = axis[None, :] ** 2 + axis[:, None] ** 2 <= radius**2
    return inside.reshape(n, sub, n, sub).mean(axis=(1, 3)).astype(np.float32)


def test_line_integrals_of_a_disk_are_chord_lengths():
    radius = 120.0
    s = SMALL.bin_centres()
    chord = 2 * np.sqrt(np.clip(radius**2 - s**2, 0, None))
    core = np.abs(s) < radius - 16
    # The reconstruction's system matrix (8 mm pixels): within half a pixel of the chord,
    # nothing outside the disk, and the disk's area conserved in every view.
    disk = _disk(48, 8.0, radius)
    proj = np.asarray(system_matrix(48, 8.0, SMALL, 1).forward(jnp.asarray(disk[None])))[0]
    assert np.max(np.abs(proj[:, core] - chord[core])) < 4.0
    assert np.all(proj[:, np.abs(s) > radius + 24] == 0)  # footprint: <= 2 pixels
    np.testing.assert_allclose(proj.sum(1) * SMALL.bin_mm, np.pi * radius**2, rtol=5e-3)
    # The finer data model (4 mm pixels, 2 rays per bin): within 1 % of every chord.
    fine = np.asarray(line_integrals(jnp.asarray(_disk(96, 4.0, radius)[None]), pixel_mm=4.0,
                                     geometry=SMALL))[0]
    assert np.max(np.abs(fine[:, core] - chord[core]) / chord[core]) < 0.01


def test_osem_converges_to_truth_in_a_uniform_region():
    # Data from the fine model (not the reconstruction's), attenuation, no noise.
    radius, geometry = 150.0, SinogramGeometry(n_bins=64, bin_mm=8.0, n_views=32)
    fine = _disk(128, 4.0, radius)
    emission = np.asarray(line_integrals(jnp.asarray(2.0 * fine[None]), pixel_mm=4.0,
                                         geometry=geometry))
    mu = np.asarray(line_integrals(jnp.asarray(MU_WATER * fine[None]), pixel_mm=4.0,
                                   geometry=geometry))
    m = 50.0 * np.exp(-mu)
    data = m * emission + 1.0
    system = system_matrix(64, 8.0, geometry, 4)
    axis = (np.arange(64) - 31.5) * 8.0
    centre = axis[None, :] ** 2 + axis[:, None] ** 2 <= 80.0**2
    errors = []
    for iterations in (2, 20):
        settings = ReconSettings(iterations, 4, 0.0, 0.0, 0.0, 1.0)
        image = osem(data, m, np.ones_like(data), system, settings)[0]
        assert np.all(image >= 0)
        errors.append(abs(image[centre].mean() / 2.0 - 1.0))
    assert errors[1] < 0.02 and errors[1] <= errors[0] + 1e-3


def test_thinning_and_splitting_are_exact():
    mean = jnp.full((100_000,), 40.0)
    y = acquisition.poisson(simulation_key(1), mean)
    a, b = acquisition.split_halves(jax.random.key(2), y)
    assert bool(jnp.all(a + b == y)) and bool(jnp.all(a >= 0)) and bool(jnp.all(b >= 0))
    assert abs(float(a.mean()) / 20.0 - 1) < 0.01 and abs(float(b.mean()) / 20.0 - 1) < 0.01
    assert abs(float(jnp.corrcoef(a, b)[0, 1])) < 0.02  # independent Poisson halves
    pieces = acquisition.split_realisations(jax.random.key(3), y, 10)
    assert bool(jnp.all(pieces.sum(0) == y))
    np.testing.assert_allclose(np.asarray(pieces.mean(1)), 4.0, rtol=0.02)
    thinned = acquisition.thin(jax.random.key(4), y, 0.25)
    assert bool(jnp.all(thinned <= y))
    assert abs(float(thinned.mean()) / 10.0 - 1) < 0.01
    assert abs(float(thinned.var() / thinned.mean()) - 1) < 0.03  # Poisson: var = mean


def test_gaussian_blur_is_self_adjoint_and_preserves_mass():
    kx, ky = jax.random.split(jax.random.key(5))
    x = jax.random.uniform(kx, (2, 40, 30))
    y = jax.random.uniform(ky, (2, 40, 30))
    blur = lambda v: acquisition.gaussian_blur(v, 4.0, 6.0, 3.0)  # noqa: E731
    np.testing.assert_allclose(float(jnp.vdot(blur(x), y)), float(jnp.vdot(x, blur(y))),
                               rtol=1e-6)
    point = jnp.zeros((1, 40, 30)).at[0, 20, 15].set(1.0)
    assert abs(float(blur(point).sum()) - 1.0) < 1e-5


TINY = SimConfig(n_slices=2, recon_n=32, recon_pixel_mm=16.0,
                 geometry=SinogramGeometry(n_bins=32, bin_mm=16.0, n_views=24))


def test_a_seed_reproduces_a_study_bit_for_bit():
    settings = dict(VERSIONS)
    try:  # tiny geometry: 24 views split into 12 subsets for both versions
        VERSIONS["v2"] = dataclasses.replace(settings["v2"], subsets=12)
        kwargs = dict(levels=(30,), halves_seconds=120.0, realisations=2, n_lesions=1)
        a = simulate_study(simulation_key(7), TINY, **kwargs)
        b = simulate_study(simulation_key(7), TINY, **kwargs)
        c = simulate_study(simulation_key(8), TINY, **kwargs)
    finally:
        VERSIONS.update(settings)
    assert a.images.keys() == b.images.keys()
    assert {"v1/target", "v2/inputs/030", "v2/halves/a", "v1/realisations"} <= set(a.images)
    for key in a.images:
        assert a.images[key].tobytes() == b.images[key].tobytes(), key
    assert a.truth.tobytes() == b.truth.tobytes()
    assert a.truth.tobytes() != c.truth.tobytes()


@pytest.fixture(scope="module")
def test_study():
    """A low-BMI test study on the real 4 mm grid, 2 slices, 4 realisations."""
    return simulate_study(simulation_key(11), SimConfig(n_slices=2), realisations=4,
                          noiseless=True, liver_lesion=True, target=False)


def test_v2_noise_is_finer_than_v1(test_study):
    voi = test_study.rois["liver_voi"]
    corr = {}
    for v in ("v1", "v2"):
        reals = test_study.images[f"{v}/realisations"]
        corr[v] = report.lag1_autocorrelation(reals - reals.mean(0), voi)
    assert 0 < corr["v2"] < corr["v1"] < 1


def test_v2_recovers_small_lesions_better_and_rounder(test_study):
    lesion = test_study.rois["lesion_0"]
    true_suv = test_study.attrs["lesions"][0]["suv"]
    recovery = {v: test_study.images[f"{v}/noiseless"][lesion].mean() / true_suv
                for v in ("v1", "v2")}
    aspect = {v: report.lesion_aspect_ratio(test_study.images[f"{v}/noiseless"], lesion, 4.0)
              for v in ("v1", "v2")}
    assert recovery["v2"] > recovery["v1"]
    assert aspect["v1"] > aspect["v2"]


def test_report_measures_on_synthetic_images():
    rng = np.random.default_rng(0)
    white = rng.normal(size=(20, 1, 40, 40))
    roi = np.ones((1, 40, 40), bool)
    assert abs(report.lag1_autocorrelation(white, roi)) < 0.03
    smooth = np.asarray(acquisition.gaussian_blur(jnp.asarray(white[:, 0]), 1.0, 3.0))[:, None]
    assert report.lag1_autocorrelation(smooth, roi) > 0.5
    yy, xx = np.mgrid[:41, :41] - 20.0
    blob = np.exp(-0.5 * ((xx / 4.0) ** 2 + (yy / 2.0) ** 2))[None]  # sigma_x = 2 sigma_y
    lesion = np.zeros((1, 41, 41), bool)
    lesion[0, 20, 20] = True
    assert report.lesion_aspect_ratio(blob, lesion, 1.0) == pytest.approx(2.0, rel=0.05)


# --- datasets ----------------------------------------------------------------------------

def _fake_study(shape=(2, 8, 8), versions=("v2",), levels=(30,)) -> Study:
    rng = np.random.default_rng(0)
    images = {}
    for v in versions:
        images[f"{v}/target"] = rng.random(shape, dtype=np.float32)
        for lv in levels:
            images[f"{v}/{dataset.level_key(lv)}"] = rng.random(shape, dtype=np.float32)
    rois = {"body": np.ones(shape, bool), "liver_voi": np.zeros(shape, bool)}
    attrs = {"bmi_class": "low", "bmi": 21.0, "trues_per_slice_120s": 1e6, "lesions": []}
    return Study(rng.random(shape, dtype=np.float32), rois, images, attrs)


def _write(path, studies=None):
    return dataset.write_dataset(
        path, studies or [_fake_study(), _fake_study()], role="train", versions=("v2",),
        levels_s=(30,), sim_config={"n_slices": 2}, recon_settings={}, seed=0)


def test_dataset_roundtrip(tmp_path):
    path = _write(tmp_path / "train.h5")
    info = dataset.open_dataset(path)
    assert info.role == "train" and info.versions == ("v2",) and info.levels_s == (30.0,)
    assert info.studies == ("study_000", "study_001")
    study = dataset.load_study(path, "study_001")
    assert study["v2/inputs/030"].shape == (2, 8, 8) and study["rois/body"].dtype == bool
    assert study["attrs"]["bmi_class"] == "low"


def _corrupt(path, action):
    with h5py.File(path, "r+") as f:
        action(f)


@pytest.mark.parametrize(
    "action, message",
    [
        (lambda f: f["study_001"].__delitem__("v2/inputs/030"),
         "study 'study_001': no key 'v2/inputs/030'"),
        (lambda f: (f["study_000"].__delitem__("v2/target"),
                    f["study_000"].create_dataset("v2/target", data=np.zeros((2, 8, 7),
                                                                              np.float32))),
         "study 'study_000': key 'v2/target' has shape (2, 8, 7), expected (2, 8, 8)"),
        (lambda f: (f["study_000"].__delitem__("truth"),
                    f["study_000"].create_dataset("truth", data=np.zeros((2, 8, 8)))),
         "key 'truth' has dtype float64, expected float32"),
        (lambda f: f["study_001"]["v2/target"].__setitem__((0, 0, 0), np.nan),
         "study 'study_001': key 'v2/target' holds 1 NaN or infinite values"),
        (lambda f: f.attrs.__setitem__("schema_version", 99),
         "schema version 99, this reader needs 1"),
        (lambda f: f.attrs.__delitem__("role"), "missing root attribute 'role'"),
        (lambda f: f["study_000"].__delitem__("rois/liver_voi"),
         "study 'study_000': missing key 'rois/liver_voi'"),
    ],
    ids=["missing", "shape", "dtype", "nan", "schema", "root_attr", "roi"],
)
def test_reader_rejects_malformed_files(tmp_path, action, message):
    path = _write(tmp_path / "train.h5")
    _corrupt(path, action)
    with pytest.raises(dataset.DatasetError) as err:
        dataset.open_dataset(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_reader_rejects_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(dataset.DatasetError, match="no such file"):
        dataset.open_dataset(tmp_path / "absent.h5")
    bogus = tmp_path / "bogus.h5"
    bogus.write_text("not hdf5")
    with pytest.raises(dataset.DatasetError, match="not a readable HDF5 file"):
        dataset.open_dataset(bogus)


def test_interrupted_write_leaves_no_file(tmp_path):
    bad = _fake_study()
    bad.images["v2/target"] = np.full((2, 8, 8), np.nan, np.float32)  # rejected on validation
    with pytest.raises(dataset.DatasetError, match="NaN"):
        _write(tmp_path / "train.h5", [bad])
    assert list(tmp_path.iterdir()) == []


def test_axial_post_filter_preserves_uniform_stacks_and_smooths_noise():
    from tgd_jax.sim.recon import axial_filter_matrix

    m = np.asarray(axial_filter_matrix(6, 4.0, 5.0))
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)  # no loss at the first/last slice
    assert np.allclose(m, m.T, atol=0.05) and np.all(np.diag(m) < 1)
    noise = np.random.default_rng(0).normal(size=(6, 500))
    assert (m @ noise)[1:-1].var() < 0.8 * noise[1:-1].var()


def test_noise_levels_are_read_per_version():
    # The demo dataset's measured liver CoV (%), rounded: inside the bands of each version.
    cov = {"v1": {"low": {"600": 3.4, "030": 9.3, "180": 4.6},
                  "high": {"600": 3.0, "030": 13.0, "180": 5.7}},
           "v2": {"low": {"600": 6.7, "030": 25.0, "180": 11.0},
                  "high": {"600": 8.6, "030": 37.7, "180": 16.4}}}
    assert report.noise_levels_ok(cov) == (True, True)
    v1_too_noisy = {**cov, "v1": {**cov["v1"], "high": {"600": 3.0, "030": 16.0, "180": 5.7}}}
    assert report.noise_levels_ok(v1_too_noisy) == (False, True)  # 16 % > v1's 15 %
    v2_target_noisy = {**cov, "v2": {**cov["v2"], "high": {"600": 11.0, "030": 37.7,
                                                          "180": 16.4}}}
    assert report.noise_levels_ok(v2_target_noisy)[0] is False
    swapped = {"v2": {"low": cov["v2"]["high"], "high": cov["v2"]["low"]}}
    assert report.noise_levels_ok(swapped) == (True, False)


def test_roles_never_share_a_patient():
    from tgd_jax.sim import generate

    # train keeps its original stream: fold_in(key(seed), index)
    for i in (0, 3):
        expected = jax.random.fold_in(simulation_key(5), i)
        assert np.array_equal(jax.random.key_data(generate.study_key("train", i, 5)),
                              jax.random.key_data(expected))
    keys = {role: [jax.random.key_data(generate.study_key(role, i, 5)).tolist()
                   for i in range(3)] for role in generate.ROLE_STREAMS}
    flat = [tuple(k) for ks in keys.values() for k in ks]
    assert len(set(flat)) == len(flat)  # every study of every role has its own key
    # and the phantoms differ: study 0 of train and of test, both high BMI, same seed
    spec = {role: generate.RoleSpec(role, 1, 2, high_bmi_fraction=1.0, versions=("v2",),
                                    levels=(), realisations=2 if role == "test" else 0)
            for role in ("train", "test")}
    truth = {role: generate.make_study(spec[role], 0, 5, SimConfig(n_slices=2)).truth
             for role in spec}
    change = np.abs(truth["train"] - truth["test"]).sum() / np.abs(truth["train"]).sum()
    assert change > 0.05, change


def test_oncology_studies_hold_several_lesions_and_small_hot_structures():
    from tgd_jax.sim.phantom import make_phantom

    grid = SimConfig(n_slices=12).fine_grid
    for i in range(3):
        key = jax.random.fold_in(simulation_key(0), i)
        sparse = make_phantom(key, grid, recipe="sparse")
        onc = make_phantom(key, grid, recipe="oncology")
        lesions = onc.attrs["lesions"]
        assert 3 <= len(lesions) <= 8
        for lesion in lesions:
            assert 4.0 <= lesion["diameter_mm"] <= 20.0
            assert lesion["organ"] in ("liver", "lung", "node", "bone")
        assert onc.rois["hot"].any() and not (onc.rois["hot"] & onc.rois["liver_voi"]).any()
        assert int(onc.rois["hot"].sum()) > 2 * sum(
            int(m.sum()) for k, m in sparse.rois.items() if k.startswith("lesion"))
        # the sparse recipe draws what it always drew (its own random stream is untouched)
        again = make_phantom(key, grid)
        assert again.activity.tobytes() == sparse.activity.tobytes()
    with pytest.raises(ValueError, match="recipe must be one of"):
        make_phantom(key, grid, recipe="dense")


def test_graded_test_lesions_are_where_and_what_they_claim():
    from tgd_jax.sim.phantom import GRADED_CONTRAST, GRADED_LESIONS, HEADLINE_LESION, make_phantom

    grid = SimConfig(n_slices=16).fine_grid
    zc = (np.arange(grid.n_slices) + 0.5) * grid.slice_mm
    ax = grid.axis()
    for i, bmi in ((0, "low"), (1, "high")):
        key = jax.random.fold_in(simulation_key(2), i)
        single = make_phantom(key, grid, bmi=bmi, liver_lesion=True)
        graded = make_phantom(key, grid, bmi=bmi, liver_lesion=True, lesion_set="graded")
        # the original lesion and the anatomy are those of the single-lesion study
        assert (graded.rois["lesion_0"] == single.rois["lesion_0"]).all()
        assert (graded.rois["liver"] == single.rois["liver"]).all()
        entries = [e for e in graded.attrs["lesions"] if "roi" in e]
        assert graded.attrs["graded_missing"] == []
        assert sorted(e["roi"] for e in entries) == sorted(
            f"lesion_{o}_{d:g}mm" for o, sizes in GRADED_LESIONS.items() for d in sizes)
        assert HEADLINE_LESION in graded.rois
        others = [graded.rois[k] for k in graded.rois if k.startswith("lesion")]
        for e in entries:
            mask, shell = graded.rois[e["roi"]], graded.rois["bg" + e["roi"][6:]]
            organ = graded.rois["liver"] if e["organ"] == "liver" else ~single.rois["liver"]
            assert (mask <= graded.rois["body"]).all() and (mask <= organ).all()
            assert not (mask & graded.rois["liver_voi"]).any()
            assert shell.any() and (shell <= organ).all()
            assert not any((shell & m).any() for m in others)
            # the ROI is the sphere of its diameter around its centre (grid-sampled)
            x0, y0, z0 = e["centre_mm"]
            zz, yy, xx = np.meshgrid(zc + graded.attrs["z_start_mm"], ax, ax, indexing="ij")
            sphere = (xx - x0) ** 2 + (yy - y0) ** 2 + (zz - z0) ** 2 <= (e["diameter_mm"] / 2) ** 2
            assert (sphere == mask).all()
            # 4:1 over the organ's uptake, uniform in the truth
            assert np.allclose(graded.activity[mask], e["suv"])
            assert e["suv"] == pytest.approx(GRADED_CONTRAST * e["background_suv"])
            assert np.median(single.activity[shell]) == pytest.approx(e["background_suv"])
        # 10 mm between any two lesions' surfaces
        spots = [(tuple(e["centre_mm"]), e["diameter_mm"] / 2) for e in graded.attrs["lesions"]]
        for a in range(len(spots)):
            for b in range(a):
                gap = np.linalg.norm(np.subtract(spots[a][0], spots[b][0]))
                assert gap >= spots[a][1] + spots[b][1] + 10 - 1e-6
    # a slab thinner than a sphere leaves it out and says so
    thin = make_phantom(key, SimConfig(n_slices=4).fine_grid, liver_lesion=True,
                        lesion_set="graded")
    assert "lesion_liver_22mm" in thin.attrs["graded_missing"]
    assert "lesion_liver_22mm" not in thin.rois and "lesion_liver_10mm" in thin.rois
    with pytest.raises(ValueError, match="lesion_set must be one of"):
        make_phantom(key, grid, lesion_set="nema")


def test_a_noiseless_training_file_holds_the_same_noisy_images_and_recipe():
    from tgd_jax.sim import generate

    plain = generate.RoleSpec("train", 1, 2, versions=("v2",), levels=(60.0,))
    clean = dataclasses.replace(plain, noiseless=True)
    a = generate.make_study(plain, 0, 3, SimConfig(n_slices=2))
    b = generate.make_study(clean, 0, 3, SimConfig(n_slices=2))
    assert set(b.images) == set(a.images) | {"v2/noiseless"}
    for key in a.images:  # the noise-free image draws no random numbers
        assert a.images[key].tobytes() == b.images[key].tobytes(), key
    # the noise-free reconstruction is another image than the 600 s one
    assert not np.array_equal(b.images["v2/noiseless"], b.images["v2/target"])
    # files written before the field existed describe the same dataset as before
    assert "noiseless" not in generate.recipe_of(plain, 3)["spec"]
    assert generate.recipe_of(clean, 3)["spec"]["noiseless"] is True
