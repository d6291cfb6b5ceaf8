"""TensorBoard event files: every run writes the numbers of metrics.jsonl and an image of a
fixed validation slice, read back here with tgd_jax.train.tensorboard.read_events."""

from __future__ import annotations

import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import quiet, tiny_train_config

from tgd_jax import optim
from tgd_jax.pet import config as config_lib
from tgd_jax.pet import pipeline
from tgd_jax.pet.training import learning_rate_at
from tgd_jax.train.tensorboard import EventWriter, read_events


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    return height, width


def _scalars(events, tag):
    return {e["step"]: e["value"] for e in events if e["tag"] == tag}


@pytest.fixture(scope="module")
def finetuned(toy_data, pretrained, tmp_path_factory):
    """A paper-mode TGD fine-tuning with an old-task set and the gate cosine."""
    workdir = tmp_path_factory.mktemp("tb")
    config = config_lib.override(config_lib.finetune_config("tiny"), **{
        "data.path": str(toy_data["finetune"]), "checkpoint": str(pretrained),
        "method": "tgd", "tgd.mode": "paper", "tgd.gate_cosine": True,
        "old_task.path": str(toy_data["train"]), "old_task.version": "v1"})
    summary = pipeline.finetune(config, workdir, log=quiet)
    return workdir, summary


def test_every_number_of_metrics_jsonl_is_in_tensorboard(finetuned):
    workdir, summary = finetuned
    events = read_events(workdir)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert train and val
    for tag, field, rows in [("train/loss", "loss", train), ("train/steps_per_s", "steps_per_s",
                             train), ("train/gate_cosine", "gate_cosine", train),
                             ("val/loss", "val_loss", val), ("val/loss_old", "val_loss_old", val)]:
        got = _scalars(events, tag)
        assert sorted(got) == [r["step"] for r in rows], tag
        np.testing.assert_allclose([got[r["step"]] for r in rows], [r[field] for r in rows],
                                   rtol=1e-6, err_msg=tag)
    fraction = _scalars(events, "run/retrained_fraction")
    assert sorted(fraction) == [r["step"] for r in val]
    assert list(fraction.values()) == pytest.approx(
        [summary["retrained_fraction"]] * len(fraction))
    lr = _scalars(events, "train/learning_rate")
    assert sorted(lr) == [r["step"] for r in train]
    assert list(lr.values()) == pytest.approx([1e-4] * len(lr))  # fine-tuning's constant rate


def test_each_evaluation_shows_input_output_and_target(finetuned, toy_data):
    workdir, _ = finetuned
    images = [e for e in read_events(workdir) if e["tag"] == "val/slice_input_output_target"]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in images] == [r["step"] for r in records if "val_loss" in r]
    height, width = _png_size(images[0]["image"])
    assert width == 3 * height == 3 * 32  # the toy studies are 32 x 32 in-plane
    # the input and the target stay, the network's output moves with training
    assert images[0]["image"] != images[-1]["image"]


def test_a_resumed_run_hides_what_the_killed_one_wrote_after_its_checkpoint(tmp_path):
    first = EventWriter(tmp_path)
    first.scalars(1, {"loss": 1.0})
    first.scalars(2, {"loss": 2.0})
    first.scalars(3, {"loss": 3.0})  # after the checkpoint at step 2: written again
    first.close()
    again = EventWriter(tmp_path, purge_step=3)
    again.scalars(3, {"loss": 30.0})
    again.close()
    assert [(e["step"], e["value"]) for e in read_events(tmp_path)] == [
        (1, 1.0), (2, 2.0), (3, 30.0)]


def test_only_the_first_process_writes(tmp_path):
    writer = EventWriter(tmp_path, enabled=False)
    writer.scalars(1, {"loss": 1.0})
    writer.image(1, "x", np.zeros((4, 12)))
    writer.close()
    assert not (tmp_path / "tensorboard").exists() and read_events(tmp_path) == []


def test_the_learning_rate_shown_is_the_optimizer_schedule(toy_data):
    config = tiny_train_config(toy_data["train"], **{"optimizer.schedule": "cosine",
                                                     "optimizer.learning_rate": 0.01})
    shown = learning_rate_at(config, 12)
    # Independent truth: the optimizer the runs use, as plain SGD on a unit gradient, moves
    # a weight by exactly its learning rate; step s is made by the update of count s - 1.
    tx = optim.make_optimizer(num_steps=12, learning_rate=0.01, schedule="cosine",
                              name="sgd", momentum=0.0)
    params = {"w": jnp.zeros(())}
    state, applied = tx.init(params), []
    for _ in range(12):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        applied.append(-float(updates["w"]))
    assert [shown(s) for s in range(1, 13)] == pytest.approx(applied, rel=1e-6)
    assert applied[0] > applied[5] > applied[11] > 0  # a real cosine, not a constant
