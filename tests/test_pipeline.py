"""The experiments end to end on toy data, checked against invariants of each method.

Frozen elements must be bit-identical to the starting checkpoint (compared as bytes),
retrainable ones must move, and the choice of weights must follow each method's rule.
"""

from __future__ import annotations

import json
import shutil

import h5py
import jax
import numpy as np
import pytest
from conftest import quiet, tiny_train_config
from flax import traverse_util

from tgd_jax.io import workdir as workdir_lib
from tgd_jax.pet import config as config_lib
from tgd_jax.pet import data as data_lib
from tgd_jax.pet import pipeline
from tgd_jax.pet.dataset import DatasetError
from tgd_jax.train import checkpoints
from tgd_jax.train.trainer import NonFiniteLossError


def _config(kind, path, checkpoint, **overrides):
    return config_lib.override(getattr(config_lib, f"{kind}_config")("tiny"),
                               **{"data.path": str(path), "checkpoint": str(checkpoint)},
                               **overrides)


def _flat(tree):
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


def _channels(workdir):
    return {k: np.asarray(v, bool) for k, v in
            json.loads((workdir / "mask.json").read_text())["channels"].items()}


def _check_frozen_and_moved(before, after, channels, stats_before=None, stats_after=None):
    """Per conv/BN leaf: frozen channels bit-identical, retrained channels changed."""
    moved = total = 0
    for path, old in before.items():
        layer, name = path.split("/")
        conv = layer.replace("bn", "conv")
        retrain = channels[conv]
        new = after[path]
        for c in range(old.shape[-1]):
            if retrain[c]:
                total += old[..., c].size
                moved += int(np.sum(old[..., c] != new[..., c]))
            else:
                assert old[..., c].tobytes() == new[..., c].tobytes(), (path, c)
    if stats_before is not None:
        for path, old in stats_before.items():
            retrain = channels[path.split("/")[0].replace("bn", "conv")]
            np.testing.assert_array_equal(old[~retrain], stats_after[path][~retrain])
    return moved, total


@pytest.fixture(scope="module")
def start(pretrained):
    params, stats, _, meta = checkpoints.restore(pretrained)
    return _flat(params), _flat(stats), meta


def _source(workdir):
    """The exact checkpoint a fine-tuning run started from (recorded in its mask.json)."""
    path = json.loads((workdir / "mask.json").read_text())["source_checkpoint"]
    params, stats, _, meta = checkpoints.restore(path)
    return _flat(params), _flat(stats), meta


def _final(workdir):
    params, stats, _, meta = checkpoints.restore(workdir, "latest")
    return _flat(params), _flat(stats), meta


@pytest.mark.parametrize("method", ["tgd", "random", "l1"])
def test_masked_methods_freeze_exactly_and_move_the_rest(toy_data, pretrained, start, tmp_path,
                                                         method):
    config = _config("finetune", toy_data["finetune"], pretrained, method=method)
    summary = pipeline.finetune(config, tmp_path, log=quiet)
    p0, s0, _ = _source(tmp_path)
    p1, s1, meta = _final(tmp_path)
    assert meta["step"] == summary["steps"] == 12
    channels = _channels(tmp_path)
    assert not channels["conv4"].any()  # the last layer stays frozen
    moved, total = _check_frozen_and_moved(p0, p1, channels, s0, s1)
    assert total > 0 and moved / total > 0.9
    frac = json.loads((tmp_path / "mask.json").read_text())["retrained_fraction"]
    assert frac == pytest.approx(total / sum(v.size for v in p0.values()))


def test_random_and_l1_retrain_as_many_channels_as_tgd(toy_data, pretrained, tmp_path, start):
    counts = {}
    for method in ("tgd", "random", "l1"):
        pipeline.finetune(_config("finetune", toy_data["finetune"], pretrained, method=method,
                              num_steps=1, eval_every=1, log_every=1), tmp_path / method,
                      log=quiet)
        counts[method] = _channels(tmp_path / method)
    for layer, mask in counts["tgd"].items():
        assert counts["random"][layer].sum() == counts["l1"][layer].sum() == mask.sum()
    # l1: the chosen channels are exactly the lowest-L1 filters (brute force, NumPy).
    p0 = start[0]
    for layer, mask in counts["l1"].items():
        n = int(mask.sum())
        if 0 < n < mask.size:
            l1 = np.abs(p0[f"{layer}/kernel"]).reshape(-1, mask.size).sum(axis=0)
            assert set(np.flatnonzero(mask)) == set(np.argsort(l1, kind="stable")[:n])


def test_last_k_changes_only_the_last_three_blocks(toy_data, pretrained, start, tmp_path):
    pipeline.finetune(_config("finetune", toy_data["finetune"], pretrained, method="last_k"),
                  tmp_path, log=quiet)
    p0, s0, _ = start
    p1, s1, _ = _final(tmp_path)
    # Tiny net: conv1..conv4; the last three blocks are (conv2, bn2), (conv3, bn3), conv4.
    for path in p0:
        same = p0[path].tobytes() == p1[path].tobytes()
        assert same == path.startswith("conv1/"), path
    assert s0["bn2/mean"].tobytes() != s1["bn2/mean"].tobytes()


def test_full_moves_everything(toy_data, pretrained, start, tmp_path):
    pipeline.finetune(_config("finetune", toy_data["finetune"], pretrained, method="full"),
                  tmp_path, log=quiet)
    p0, _, _ = start
    p1, _, _ = _final(tmp_path)
    assert all(p0[k].tobytes() != p1[k].tobytes() for k in p0)


def test_online_changes_only_its_mask_and_writes_the_denoised_image(toy_data, pretrained,
                                                                   start, tmp_path):
    summary = pipeline.online(_config("online", toy_data["online"], pretrained), tmp_path,
                          log=quiet)
    assert summary["study"] == "study_000"
    assert json.loads((tmp_path / "mask.json").read_text())["phi"] == 0.4
    p0, s0, meta0 = _source(tmp_path)
    assert "/best/" in meta0["checkpoint"]  # online starts from the best, like finetune
    p1, s1, _ = _final(tmp_path)
    _check_frozen_and_moved(p0, p1, _channels(tmp_path), s0, s1)
    with h5py.File(tmp_path / "denoised.h5") as f:
        with h5py.File(toy_data["online"]) as g:
            np.testing.assert_array_equal(f["input"][()], g["study_000/v2/halves/full"][()])
        assert f["denoised"].shape == f["pretrained"].shape == (5, 32, 32)
        assert not np.array_equal(f["denoised"][()], f["pretrained"][()])
    assert (tmp_path / "online.png").stat().st_size > 0


def test_workdir_holds_config_versions_metrics_summary(pretrained):
    names = {p.name for p in pretrained.iterdir()}
    assert {"config.json", "versions.json", "metrics.jsonl", "summary.json", "checkpoints",
            "best"} <= names
    records = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 4, 8, 12]
    assert json.loads((pretrained / "config.json").read_text())["command"] == "train"


def test_rerunning_a_finished_run_changes_nothing(toy_data, pretrained, tmp_path):
    workdir = shutil.copytree(pretrained, tmp_path / "run")  # the shared one stays read-only
    before = _final(workdir)[0]
    summary = pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=quiet)
    assert summary["resumed_from"] == 12
    after = _final(workdir)[0]
    assert all(before[k].tobytes() == after[k].tobytes() for k in before)


def test_a_different_config_on_the_same_workdir_is_refused(toy_data, pretrained, tmp_path):
    workdir = shutil.copytree(pretrained, tmp_path / "run")
    with pytest.raises(ValueError, match=r"different config \(config.batch_size: 4 -> 8\)"):
        pipeline.train(tiny_train_config(toy_data["train"], batch_size=8), workdir, log=quiet)


def test_a_run_written_before_a_config_field_existed_still_resumes(toy_data, pretrained,
                                                                   tmp_path):
    # config.json as an older release wrote it: without the fields added since
    workdir = tmp_path / "old"
    shutil.copytree(pretrained, workdir)
    saved = json.loads((workdir / "config.json").read_text())
    for name in config_lib.ADDED_FIELDS:
        section, leaf = name.split(".")
        del saved["config"][section][leaf]
    (workdir / "config.json").write_text(json.dumps(saved))
    summary = pipeline.train(tiny_train_config(toy_data["train"]), workdir, log=quiet)
    assert summary["resumed_from"] == 12  # every added field at its old behaviour
    (workdir / "config.json").write_text(json.dumps(saved))
    changed = tiny_train_config(toy_data["train"])
    changed.optimizer.decay_fraction = 0.5  # not what the old run did
    with pytest.raises(ValueError, match=r"config.optimizer.decay_fraction: '<absent>' -> 0.5"
                       r"|config.optimizer.decay_fraction: 1.0 -> 0.5"):
        pipeline.train(changed, workdir, log=quiet)


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(
        toy_data, tmp_path, monkeypatch):
    sample = data_lib.sample_batch

    def poisoned(*args, step, **kw):
        batch = sample(*args, step=step, **kw)
        if step >= 6 and kw.get("stream", 0) == data_lib.STREAM_TRAIN:
            batch["inputs"][:] = np.nan
        return batch

    monkeypatch.setattr(data_lib, "sample_batch", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 7; stopped. The last good "
                                                 "checkpoint is step 4"):
        pipeline.train(tiny_train_config(toy_data["train"]), tmp_path, log=quiet)
    params, _, _, meta = checkpoints.restore(tmp_path, "latest")
    assert meta["step"] == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("overrides, error, message", [
    ({"tgd.phi": 1.5}, ValueError, r"config.tgd.phi must be in \[0, 1\].*got 1.5"),
    ({"method": "prune"}, ValueError, "config.method must be one of .*got 'prune'"),
    ({"data.version": "v1"}, DatasetError, "no reconstruction version 'v1'"),
    ({"batch_size": 0}, ValueError, "config.batch_size must be finite and > 0, got 0"),
])
def test_finetune_errors_name_the_problem(toy_data, pretrained, tmp_path, overrides, error,
                                          message):
    config = _config("finetune", toy_data["finetune"], pretrained, **overrides)
    with pytest.raises(error, match=message):
        pipeline.finetune(config, tmp_path, log=quiet)


def test_missing_checkpoint_is_named(toy_data, tmp_path):
    config = _config("finetune", toy_data["finetune"], tmp_path / "nonexistent")
    with pytest.raises(checkpoints.CheckpointError, match="nonexistent: no such workdir"):
        pipeline.finetune(config, tmp_path / "run", log=quiet)


def test_online_on_a_training_file_names_the_missing_key(toy_data, pretrained, tmp_path):
    with pytest.raises(DatasetError, match="missing key 'v2/halves/a'"):
        pipeline.online(_config("online", toy_data["train"], pretrained), tmp_path, log=quiet)


def test_checkpoint_of_another_architecture_is_refused(toy_data, pretrained, tmp_path):
    # A checkpoint whose stored config disagrees with its own parameters.
    other = tmp_path / "other"
    pipeline.train(tiny_train_config(toy_data["train"], **{"model.features": (8, 6, 8, 3)},
                                 num_steps=1), other, log=quiet)
    cfg = json.loads((other / "config.json").read_text())
    assert cfg["config"]["model"]["features"] == [8, 6, 8, 3]
    params, stats, _, _ = checkpoints.restore(other, "latest")
    reference = jax.tree.map(np.asarray, params)
    assert reference["conv2"]["kernel"].shape == (3, 3, 8, 6)
    from tgd_jax.pet.models import model_from_config

    model = model_from_config({"features": (8, 8, 8, 3), "width_multiplier": 1.0,
                               "bn_momentum": 0.9})
    template = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"'bn2/bias' has shape \(6,\) in the checkpoint but \(8,\)"):
        checkpoints.check_tree_match(template["params"], params, str(other))


def test_a_relative_workdir_works(toy_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipeline.train(tiny_train_config(toy_data["train"], num_steps=4), "relative/run", log=quiet)
    _, _, _, meta = checkpoints.restore("relative/run")
    assert meta["step"] == 4 and meta["checkpoint"].startswith(str(tmp_path))


def test_dilate_grows_a_pixel_into_a_square():
    mask = np.zeros((2, 7, 7), bool)
    mask[1, 3, 3] = True
    grown = pipeline.dilate(mask, 2)
    expected = np.zeros_like(mask)
    expected[1, 1:6, 1:6] = True
    np.testing.assert_array_equal(grown, expected)


def test_a_bad_dataset_leaves_the_workdir_untouched(toy_data, tmp_path):
    with pytest.raises(DatasetError, match="missing.h5: no such file"):
        pipeline.train(tiny_train_config(tmp_path / "missing.h5"), tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()
    summary = pipeline.train(tiny_train_config(toy_data["train"], num_steps=2), tmp_path / "run",
                         log=quiet)
    assert summary["steps"] == 2


def test_ood_errors_are_the_rmse_near_each_feature(tmp_path):
    path = tmp_path / "online.h5"
    noiseless = np.zeros((1, 9, 9), np.float32)
    bladder = np.zeros((1, 9, 9), bool)
    bladder[0, 4, 4] = True
    with h5py.File(path, "w") as f:
        f["study_000/v2/noiseless"] = noiseless
        f["study_000/rois/bladder"] = bladder.astype(np.uint8)
    image = np.zeros_like(noiseless)
    image[0, 3, 3] = 3.0  # inside the 3x3 neighbourhood (radius 1): 9 voxels
    image[0, 0, 0] = 100.0  # outside: must not count
    errors = pipeline._ood_errors(path, "study_000", "v2", {"net": image}, radius=1)
    assert errors == {"bladder": {"net": pytest.approx(np.sqrt(9.0 / 9))}}


def test_a_workdir_without_checkpoints_is_reused_with_a_new_config(toy_data, tmp_path):

    workdir_lib.prepare_workdir(tmp_path, tiny_train_config(toy_data["train"]), "train")
    config = tiny_train_config(toy_data["train"], batch_size=8)
    workdir_lib.prepare_workdir(tmp_path, config, "train")  # no checkpoints yet: allowed
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config"]["batch_size"] == 8


def test_training_touches_the_devices_from_the_main_thread_only(toy_data, tmp_path,
                                                                monkeypatch):
    # The batches are sampled on a background thread but sharded onto the devices on the
    # thread that runs the steps (tgd_jax.train.prefetch.Prefetcher).
    import threading

    from tgd_jax.train import parallel
    threads, real = [], parallel.shard_batch

    def shard_batch(batch, mesh):
        threads.append(threading.get_ident())
        assert all(isinstance(v, np.ndarray) for v in batch.values())  # host arrays in
        return real(batch, mesh)

    waits = []  # and on one device it does not wait for each step (see the next test)
    real_wait = jax.block_until_ready
    monkeypatch.setattr(parallel, "shard_batch", shard_batch)
    monkeypatch.setattr(jax, "block_until_ready", lambda x: (waits.append(1), real_wait(x))[1])
    pipeline.train(tiny_train_config(toy_data["train"], num_steps=6), tmp_path / "run",
                   log=quiet)
    assert len(threads) >= 6 and set(threads) == {threading.get_ident()}
    assert waits == []


WAITS_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[1]}"
import jax
from conftest import quiet, tiny_train_config
os.environ["TGD_ONE_STEP_IN_FLIGHT"] = "1"  # after conftest, which drops a user's export
from tgd_jax.pet import pipeline
waits, real = [], jax.block_until_ready
jax.block_until_ready = lambda x: (waits.append(1), real(x))[1]
pipeline.train(tiny_train_config(sys.argv[2], num_steps=6), sys.argv[3], log=quiet)
print("WAITS", len(waits), jax.device_count())
"""


def test_a_cpu_mesh_of_several_devices_runs_one_step_at_a_time(toy_data, tmp_path):
    # jaxlib 0.10's in-process CPU all-reduce can deadlock with several multi-device steps
    # in flight (benchmarks/rendezvous.py): the trainer waits for each step's metrics
    # (below jaxlib 0.12 by default, tests/test_parallel.py; forced here, on any version).
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    out = subprocess.run([sys.executable, "-c", WAITS_SCRIPT, "2",
                          str(toy_data["train"]), str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert "WAITS 6 2" in out.stdout, out.stdout + out.stderr[-3000:]  # 6 steps, 6 waits


@pytest.mark.parametrize("written, now, warned", [(2, 1, True), (1, 1, False), (None, 2, False)])
def test_a_resume_on_another_device_count_says_so(tmp_path, written, now, warned):
    from types import SimpleNamespace

    from tgd_jax.train import trainer
    state = SimpleNamespace(step=7)
    meta = {} if written is None else {"devices": written}
    ckpt = SimpleNamespace(workdir=tmp_path, restore_latest=lambda template, log: (state, meta),
                           reconcile_best=lambda *args: None)
    lines = []
    assert trainer.resume(ckpt, state, None, lines.append, devices=now) is state
    assert any(f"written on {written} devices and this run has {now}" in line
               for line in lines) == warned


def test_warm_up_and_hot_patches_reach_the_training_run(toy_data, tmp_path):
    # Warm-up: the first update runs at learning rate 0, so the weights after step 1 are
    # the initial ones (bit for bit); the second is not. Hot patches: another batch stream.
    from tgd_jax.pet.models import model_from_config

    def run(name, **fields):
        config = tiny_train_config(toy_data["train"], num_steps=4, eval_every=4,
                                   keep_steps=(1, 2), **fields)
        pipeline.train(config, tmp_path / name, log=quiet)
        return config, {s: checkpoints.load(tmp_path / name / "kept" / str(s))[0]
                        for s in (1, 2)}

    config, warm = run("warm", **{"optimizer.warmup_steps": 2})
    start = pipeline.initial_variables(model_from_config(config.model), config)
    for a, b in zip(jax.tree.leaves(start["params"]), jax.tree.leaves(warm[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert any(not np.array_equal(np.asarray(a), b) for a, b in zip(
        jax.tree.leaves(start["params"]), jax.tree.leaves(warm[2]), strict=True))
    _, plain = run("plain")
    _, hot = run("hot", **{"data.hot_fraction": 1.0})
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(plain[2]), jax.tree.leaves(hot[2]), strict=True))
