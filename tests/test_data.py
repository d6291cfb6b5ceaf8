"""Training pairs and stateless patch sampling, checked by brute force against the volumes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tgd_jax.pet import data
from tgd_jax.pet.dataset import DatasetError
from tgd_jax.sim.synthetic import write_toy_datasets
from tgd_jax.train.prefetch import Prefetcher


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_datasets(tmp_path_factory.mktemp("toy"), shape=(5, 16, 16))


def _dihedral(patch: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of a (p, p, C) patch."""
    out = []
    for k in range(4):
        r = np.rot90(patch, k, axes=(0, 1))
        out += [r, r[:, ::-1]]
    return out


def _find(pairs: data.PairSet, inputs: np.ndarray, targets: np.ndarray, p: int,
          augment: bool) -> bool:
    """Whether some pair, slice window, position and transform yields (inputs, targets)."""
    for i, j in pairs.pairs:
        vi, vj = pairs.volumes[i], pairs.volumes[j]
        z_n, h, w = vi.shape
        for z in range(1, z_n - 1):
            for y in range(h - p + 1):
                for x in range(w - p + 1):
                    a = np.moveaxis(vi[z - 1:z + 2, y:y + p, x:x + p], 0, -1)
                    b = np.moveaxis(vj[z - 1:z + 2, y:y + p, x:x + p], 0, -1)
                    transforms = _dihedral(a) if augment else [a]
                    targets_t = _dihedral(b) if augment else [b]
                    for ta, tb in zip(transforms, targets_t, strict=True):
                        if np.array_equal(ta, inputs) and np.array_equal(tb, targets):
                            return True
    return False


@pytest.mark.parametrize("augment", [False, True])
def test_every_example_is_a_window_of_a_pair_with_one_transform(toy, augment):
    pairs = data.supervised_pairs(toy["train"], "v1", ["study_000"])
    batch = data.sample_batch(pairs, seed=3, step=7, batch_size=4, patch_size=8,
                              augment=augment)
    assert batch["inputs"].shape == batch["targets"].shape == (4, 8, 8, 3)
    for b in range(4):
        assert _find(pairs, batch["inputs"][b], batch["targets"][b], 8, augment)


def test_batches_are_a_pure_function_of_seed_and_step(toy):
    pairs = data.supervised_pairs(toy["train"], "v1")
    kw = dict(batch_size=6, patch_size=8)
    a = data.sample_batch(pairs, seed=1, step=5, **kw)
    b = data.sample_batch(pairs, seed=1, step=5, **kw)
    c = data.sample_batch(pairs, seed=1, step=6, **kw)
    d = data.sample_batch(pairs, seed=2, step=5, **kw)
    v = data.sample_batch(pairs, seed=1, step=5, stream=data.STREAM_VAL, **kw)
    assert np.array_equal(a["inputs"], b["inputs"])
    for other in (c, d, v):
        assert not np.array_equal(a["inputs"], other["inputs"])


def test_supervised_pairs_map_every_level_to_the_same_studys_target(toy):
    pairs = data.supervised_pairs(toy["train"], "v2")
    assert len(pairs.pairs) == 3 * 2  # 3 studies x levels (30, 60)
    for i, j in pairs.pairs:
        study_i, _, kind_i, *_ = pairs.names[i].split("/")
        study_j, version, kind_j = pairs.names[j].split("/")
        assert (study_i, kind_i, version, kind_j) == (study_j, "inputs", "v2", "target")


def test_n2n_pairs_go_both_ways(toy):
    pairs = data.n2n_pairs(toy["online"], "v2")
    assert [(pairs.names[i][-1], pairs.names[j][-1]) for i, j in pairs.pairs] == [
        ("a", "b"), ("b", "a")]


def test_scale_multiplies_the_images(toy):
    one = data.supervised_pairs(toy["train"], "v1", ["study_000"])
    two = data.supervised_pairs(toy["train"], "v1", ["study_000"], scale=2.0)
    np.testing.assert_array_equal(two.volumes[0], 2 * one.volumes[0])


@pytest.mark.parametrize("call, message", [
    (lambda t: data.supervised_pairs(t["train"], "v3"), "no reconstruction version 'v3'"),
    (lambda t: data.supervised_pairs(t["online"], "v2"), "no count-level inputs"),
    (lambda t: data.supervised_pairs(t["train"], "v1", ["study_009"]), "no study 'study_009'"),
    (lambda t: data.n2n_pairs(t["train"], "v1"), "missing key 'v1/halves/a'"),
])
def test_bad_requests_name_the_problem(toy, call, message):
    with pytest.raises(DatasetError, match=message):
        call(toy)


def test_split_studies():
    assert data.split_studies(["a", "b", "c"], 1) == (["a", "b"], ["c"])
    assert data.split_studies(["a", "b"], 0) == (["a", "b"], [])
    with pytest.raises(ValueError, match="val_studies=2"):
        data.split_studies(["a", "b"], 2)


def test_steps_per_epoch_tiles_the_pairs_once(toy):
    pairs = data.supervised_pairs(toy["train"], "v1")  # 6 pairs of (5, 16, 16)
    # 6 pairs x 3 centre slices x (16/8)^2 patches = 72 patches; / 10 per batch -> 8 steps
    assert data.steps_per_epoch(pairs, 8, 10) == 8


def test_prefetcher_keeps_order_runs_ahead_and_reraises():
    made: list[int] = []
    lock = threading.Lock()

    def make(step):
        with lock:
            made.append(step)
        if step == 5:
            raise RuntimeError("bad step 5")
        return step * 10

    out = []
    with pytest.raises(RuntimeError, match="bad step 5"):
        for step, value in Prefetcher(make, 2, 9, depth=2):
            out.append((step, value))
    assert out == [(2, 20), (3, 30), (4, 40)]
    assert made == [2, 3, 4, 5]  # stops producing after the failure
    assert list(Prefetcher(lambda s: s, 0, 3)) == [(0, 0), (1, 1), (2, 2)]


def test_prefetcher_prepares_batches_on_another_thread_before_they_are_asked_for():
    # A synchronous iterator would make step 1 only when the consumer asks for it; here the
    # consumer holds on to step 0 and waits until steps 1 and 2 (depth 2) exist already.
    ready = {1: threading.Event(), 2: threading.Event()}
    threads: set[int] = set()

    def make(step):
        threads.add(threading.get_ident())
        if step in ready:
            ready[step].set()
        return step

    prefetch = Prefetcher(make, 0, 4, depth=2)
    try:
        iterator = iter(prefetch)
        assert next(iterator) == (0, 0)
        assert ready[1].wait(timeout=10) and ready[2].wait(timeout=10)
        assert list(iterator) == [(1, 1), (2, 2), (3, 3)]
    finally:
        prefetch.close()
    assert threading.get_ident() not in threads and len(threads) == 1


def test_prefetcher_places_on_the_consuming_thread_only():
    # make (NumPy only) runs on the background thread, place (the device copy) where the
    # batches are consumed: one thread uses the devices.
    made, placed = set(), set()

    def make(step):
        made.add(threading.get_ident())
        return step

    def place(value):
        placed.add(threading.get_ident())
        return value * 10

    assert list(Prefetcher(make, 0, 5, depth=2, place=place)) == [
        (s, 10 * s) for s in range(5)]
    assert placed == {threading.get_ident()}
    assert len(made) == 1 and threading.get_ident() not in made


def test_hot_voxels_are_the_top_percent_of_each_target_on_centre_slices(toy):
    pairs = data.supervised_pairs(toy["train"], "v1")
    hot = data.hot_voxels(pairs, quantile=0.95)
    assert len(hot) == len(pairs.pairs)
    for (_, goal), zyx in zip(pairs.pairs, hot, strict=True):
        vol = pairs.volumes[goal]
        inner = vol[1:-1]
        cut = np.quantile(inner, 0.95)
        brute = {(z, y, x) for z in range(1, vol.shape[0] - 1) for y in range(vol.shape[1])
                 for x in range(vol.shape[2]) if vol[z, y, x] >= cut}
        assert {tuple(v) for v in zyx.tolist()} == brute


def test_hot_oversampling_puts_a_hot_voxel_in_every_chosen_patch_and_leaves_zero_alone(toy):
    pairs = data.supervised_pairs(toy["train"], "v1")
    hot = data.hot_voxels(pairs, quantile=0.99)
    kw = dict(seed=4, step=2, batch_size=64, patch_size=6, augment=True)
    plain = data.sample_batch(pairs, **kw)
    zero = data.sample_batch(pairs, hot=hot, hot_fraction=0.0, **kw)
    assert np.array_equal(plain["inputs"], zero["inputs"])  # the stream it always was
    every = data.sample_batch(pairs, hot=hot, hot_fraction=1.0, **kw)
    cuts = {int(g): np.quantile(pairs.volumes[g][1:-1], 0.99) for _, g in pairs.pairs}
    # every target patch holds a value at or above some target volume's cut, on its
    # centre slice (channel 1); brute force over where it came from is test 1's job
    assert all(every["targets"][b, :, :, 1].max() >= min(cuts.values()) for b in range(64))
    share = np.mean([plain["targets"][b, :, :, 1].max() >= min(cuts.values())
                     for b in range(64)])
    assert share < 0.9  # uniform positions miss the hot voxels often: the test can fail
    # rows of two processes are the rows of one
    halves = [data.sample_batch(pairs, hot=hot, hot_fraction=0.5, rows=r, **kw)
              for r in (slice(0, 32), slice(32, 64))]
    whole = data.sample_batch(pairs, hot=hot, hot_fraction=0.5, **kw)
    assert np.array_equal(np.concatenate([h["inputs"] for h in halves]), whole["inputs"])
    with pytest.raises(ValueError, match="needs hot"):
        data.sample_batch(pairs, hot_fraction=0.5, **kw)


def test_the_noiseless_target_is_read_when_asked_and_named_when_absent(toy, tmp_path):
    import shutil

    import h5py

    path = shutil.copy(toy["train"], tmp_path / "train.h5")
    with pytest.raises(DatasetError, match=r"no key 'v1/noiseless' \(simulate the file with "
                                           r"--noiseless\)"):
        data.supervised_pairs(path, "v1", target="noiseless")
    with h5py.File(path, "a") as f:
        for study in f:
            f[study].create_dataset("v1/noiseless", data=f[study]["v1/target"][...] * 0.5)
    clean = data.supervised_pairs(path, "v1", target="noiseless")
    noisy = data.supervised_pairs(path, "v1")
    np.testing.assert_array_equal(clean.pairs, noisy.pairs)
    for i, j in clean.pairs:
        np.testing.assert_array_equal(clean.volumes[i], noisy.volumes[i])  # same inputs
        np.testing.assert_array_equal(clean.volumes[j], 0.5 * noisy.volumes[j])
        assert clean.names[j].endswith("/v1/noiseless"), clean.names[j]
    with pytest.raises(ValueError, match="data.target must be one of"):
        data.supervised_pairs(path, "v1", target="truth")
