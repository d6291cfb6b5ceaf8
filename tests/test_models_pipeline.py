"""The UNet and the residual denoiser through every stage of the PET pipeline (tiny scale):
pretraining, fine-tuning in both modes, online learning, threshold study, evaluation and
denoising; frozen elements bit-identical to the starting checkpoint."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import quiet, tiny_train_config
from test_any_convnet import check_frozen_and_moved

from tgd_jax import masks
from tgd_jax.graph import ChannelGraph
from tgd_jax.pet import config as config_lib
from tgd_jax.pet import evaluate as evaluate_lib
from tgd_jax.pet import pipeline
from tgd_jax.pet import premise as premise_lib
from tgd_jax.pet.denoise import denoise_file, read_volume
from tgd_jax.train import checkpoints


@pytest.fixture(scope="module", params=["unet", "resnet"])
def pretrained_model(request, toy_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"pretrained-{request.param}")
    pipeline.train(tiny_train_config(toy_data["train"], **{"model.name": request.param}),
                   workdir, log=quiet)
    return request.param, workdir


def _plan_masks(workdir):
    """The params and statistics masks of a run, rebuilt from its mask.json and graph.json."""
    graph = ChannelGraph.from_json(json.loads((workdir / "graph.json").read_text()))
    record = json.loads((workdir / "mask.json").read_text())
    channels = {k: np.asarray(v, bool) for k, v in record["channels"].items()}
    params, stats, _, _ = checkpoints.restore(record["source_checkpoint"])
    running = masks.running_norms(graph, channels, frozen_bn=record["frozen_bn"],
                                  retrained_bn=record["retrained_bn"])
    return (params, stats, masks.expand_channel_masks(params, graph, channels),
            masks.statistics_mask(stats, graph, channels, running), graph)


@pytest.mark.parametrize("mode", ["paper", "projected"])
def test_finetune_freezes_exactly(pretrained_model, toy_data, tmp_path, mode):
    name, pretrained = pretrained_model
    config = config_lib.override(config_lib.finetune_config("tiny"), **{
        "data.path": str(toy_data["finetune"]), "checkpoint": str(pretrained),
        "tgd.mode": mode, "tgd.phi": 0.6})
    summary = pipeline.finetune(config, tmp_path, log=quiet)
    assert summary["mode"] == mode and json.loads(
        (tmp_path / "config.json").read_text())["config"]["model"]["name"] == name
    params, stats, mask, stats_mask, graph = _plan_masks(tmp_path)
    if name == "resnet":
        assert graph.groups  # the residual stream
    else:
        assert any(len(r) > 1 for r in graph.readers.values())  # the skips
    after, after_stats, _, _ = checkpoints.restore(tmp_path, "latest")
    assert check_frozen_and_moved(mask, params, after) > 0
    check_frozen_and_moved(stats_mask, stats, after_stats)


def test_online_threshold_evaluate_and_denoise(pretrained_model, toy_data, tmp_path):
    name, pretrained = pretrained_model
    config = config_lib.override(config_lib.online_config("tiny"), **{
        "data.path": str(toy_data["online"]), "checkpoint": str(pretrained)})
    summary = pipeline.online(config, tmp_path / "online", log=quiet)
    assert (tmp_path / "online" / "denoised.h5").exists() and summary["steps"] > 0
    result = premise_lib.threshold_checkpoint(str(pretrained), str(toy_data["train"]),
                                              tmp_path / "threshold", examples=8,
                                              phis=(0.3, 0.6), random_draws=2, log=quiet)
    assert [r["phi"] for r in result["rows"]] == [0.3, 0.6]
    assert result["rows"][1]["fraction"] >= result["rows"][0]["fraction"]
    metrics = evaluate_lib.evaluate(toy_data["test"], {name: str(pretrained)})
    assert {row["network"] for row in metrics["rows"]} == {"input", name}
    denoise_file(pretrained, toy_data["test"], tmp_path / "out.h5", study="study_000",
                 key="v2/realisations")
    with h5py.File(tmp_path / "out.h5", "r") as f:
        denoised = f["denoised"][()]
    noisy, _ = read_volume(toy_data["test"], study="study_000", key="v2/realisations")
    assert denoised.shape == noisy.shape and np.all(np.isfinite(denoised))
