"""Checkpoints: exact round trips (TGD mask included), best tracking, the loader, clear errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tgd_jax import optim
from tgd_jax.pet.models import DnCNN
from tgd_jax.train import checkpoints
from tgd_jax.train.step import create_train_state


def _state(seed=0, features=(4, 6, 3)):
    model = DnCNN(features=features)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)))
    mask = jax.tree.map(lambda p: jnp.arange(p.size).reshape(p.shape) % 3 == 0,
                        variables["params"])
    tx = optim.tgd(optax.adam(1e-3), mask)
    return create_train_state(variables, tx), tx


def _leaves_bytes(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_round_trip_is_exact_and_keeps_the_mask(tmp_path):
    state, _ = _state(0)
    other, _ = _state(1)  # same structure, other values: the restore must overwrite them
    ckpt = checkpoints.Checkpointer(tmp_path)
    ckpt.save(7, state, {"note": "x"}, val_loss=0.5)
    ckpt.wait()
    restored, meta = ckpt.restore_latest(other)
    ckpt.close()
    assert _leaves_bytes(restored) == _leaves_bytes(state)
    assert meta["note"] == "x" and meta["step"] == 7
    mask = optim.find_mask(restored.opt_state)
    np.testing.assert_array_equal(mask["conv1"]["kernel"],
                                  optim.find_mask(state.opt_state)["conv1"]["kernel"])


def test_keeps_the_last_few_and_the_best(tmp_path):
    state, _ = _state()
    ckpt = checkpoints.Checkpointer(tmp_path, keep=2)
    for step, loss in [(1, 0.9), (2, 0.3), (3, 0.5), (4, 0.7)]:
        ckpt.save(step, state, {}, val_loss=loss)
    ckpt.wait()
    assert ckpt.best_step == 2 and ckpt.best_loss == pytest.approx(0.3)
    ckpt.close()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 4]
    assert [p.name for p in (tmp_path / "best").iterdir()] == ["2"]
    # A new Checkpointer on the same workdir remembers the best loss.
    again = checkpoints.Checkpointer(tmp_path, keep=2)
    assert again.best_loss == pytest.approx(0.3)
    again.close()


def test_load_returns_params_stats_and_config(pretrained):
    params, stats, config, meta = checkpoints.restore(pretrained, "latest")
    assert meta["step"] == 12 and config.data.version == "v1"
    assert set(params) == {"conv1", "conv2", "bn2", "conv3", "bn3", "conv4"}
    assert stats["bn2"]["mean"].shape == (8,)
    _, _, _, best = checkpoints.restore(pretrained)  # default: the best
    assert best["checkpoint"].startswith(str(pretrained / "best"))
    _, _, _, at4 = checkpoints.restore(pretrained / "checkpoints", "4")
    assert at4["step"] == 4


def test_load_returns_exactly_what_was_saved(tmp_path):
    # Independent truth: the arrays of the state that was saved, not another reader.
    state, _ = _state(3)
    state = state.replace(batch_stats=jax.tree.map(lambda x: x + 0.25, state.batch_stats))
    ckpt = checkpoints.Checkpointer(tmp_path)
    ckpt.save(5, state, {"config": {"data": {"version": "v9"}, "seed": 11}}, val_loss=0.1)
    ckpt.wait()
    ckpt.close()
    params, stats, config = checkpoints.load(tmp_path, "latest")
    assert _leaves_bytes(params) == _leaves_bytes(state.params)
    assert _leaves_bytes(stats) == _leaves_bytes(state.batch_stats)
    assert config.data.version == "v9" and config.seed == 11


def test_check_tree_match_names_the_first_mismatching_leaf():
    small, _ = _state(features=(4, 6, 3))
    big, _ = _state(features=(4, 8, 3))
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"'bn2/bias' has shape \(8,\) in the checkpoint but \(6,\)"):
        checkpoints.check_tree_match({"p": small.params}["p"], big.params, "ck")
    with pytest.raises(checkpoints.CheckpointError, match="the model has 'conv9/kernel'"):
        checkpoints.check_tree_match({**small.params, "conv9": {"kernel": jnp.zeros(2)}},
                                     small.params, "ck")


def test_resume_into_another_architecture_is_refused(tmp_path):
    small, _ = _state(features=(4, 6, 3))
    big, _ = _state(features=(4, 8, 3))
    ckpt = checkpoints.Checkpointer(tmp_path)
    ckpt.save(1, small, {})
    ckpt.wait()
    with pytest.raises(checkpoints.CheckpointError, match="has shape"):
        ckpt.restore_latest(big)
    ckpt.close()


def test_resolve_errors(tmp_path, pretrained):
    with pytest.raises(checkpoints.CheckpointError, match="no such workdir"):
        checkpoints.resolve(tmp_path / "missing")
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoints found"):
        checkpoints.resolve(tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match=r"no checkpoint at step 5 \(have"):
        checkpoints.resolve(pretrained, "5")


def test_keep_steps_are_kept_for_good_and_validated(toy_data, tmp_path):
    from conftest import quiet, tiny_train_config

    from tgd_jax.pet import pipeline

    config = tiny_train_config(toy_data["train"], keep_checkpoints=1, keep_steps=(3, 5),
                               num_steps=8, eval_every=4)
    pipeline.train(config, tmp_path, log=quiet)
    # rotation keeps only the newest of the regular ones; 3 and 5 stay, with their metadata
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [8]
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["3", "5"]
    restored = checkpoints.restore(tmp_path / "kept" / "3")
    assert restored.meta["step"] == 3 and restored.meta["val_loss"] is not None
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "val_loss" in json.loads(line)]
    assert {3, 4, 5, 8} <= set(steps)


def test_a_best_whose_meta_is_unreadable_is_set_aside_not_a_crash(tmp_path):
    state, _ = _state()
    ckpt = checkpoints.Checkpointer(tmp_path)
    ckpt.save(2, state, {}, val_loss=0.3)
    ckpt.close()
    metas = [p for p in (tmp_path / "best" / "2" / "meta").rglob("*") if p.is_file()]
    assert metas
    for path in metas:  # the JSON itself damaged; orbax's own metadata stays readable
        path.write_text("{not json")
    lines = []
    again = checkpoints.Checkpointer(tmp_path, log=lines.append)
    assert again.best_loss == float("inf") and again.best_step is None
    again.close()
    assert (tmp_path / "damaged" / "best-2").is_dir()
    assert len(lines) == 1 and "skipped damaged checkpoint" in lines[0], lines
