"""Configs: presets are data applied in order, one validate() names every bad field, and a
fine-tuning run adopts its checkpoint's architecture without editing the caller's config."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pytest
from conftest import quiet, tiny_train_config

from tgd_jax.pet import config as config_lib
from tgd_jax.pet import pipeline

COMMANDS = ("train", "finetune", "online")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("preset", config_lib.PRESETS)
def test_presets_are_the_defaults_plus_their_data(command, preset):
    default = getattr(config_lib, f"{command}_config")().to_dict()
    sized = getattr(config_lib, f"{command}_config")(preset)
    fields = config_lib.PRESET_FIELDS[preset]
    assert set(fields) <= {"all", *COMMANDS}  # a misspelled command would be ignored
    expected = {**fields.get("all", {}), **fields.get(command, {})}
    for field, value in expected.items():  # the command's own values win over the size's
        node = sized
        for part in field.split("."):
            node = node[part]
        assert node == value, field
    before, after = _flat(default), _flat(sized.to_dict())
    assert {k for k in before if before[k] != after[k]} <= set(expected)  # nothing else moves


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("preset", ["", "demo", "tiny"])
def test_every_shipped_config_file_validates(command, preset):
    config = runpy.run_path(str(CONFIGS / f"{command}.py"))["get_config"](preset)
    if command != "train":
        config.checkpoint = "runs/demo/v1net"  # the one field a user must give
    assert config_lib.validate(config) is config


def test_validate_names_every_bad_field_at_once():
    c = config_lib.finetune_config("tiny")
    c.checkpoint = "x"
    config_lib.override(c, **{"tgd.phi": 1.5, "batch_size": 0, "optimizer.name": "rmsprop",
                              "keep_checkpoints": 0, "optimizer.l2": float("nan"),
                              "tgd.frozen_bn": "sometimes"})
    with pytest.raises(ValueError) as error:
        config_lib.validate(c)
    message = str(error.value)
    for expected in ("config.tgd.phi must be in [0, 1] (KSE is normalised), got 1.5",
                     "config.batch_size must be finite and > 0, got 0",
                     "config.optimizer.name must be one of ('adam', 'adamw', 'sgd'), "
                     "got 'rmsprop'",
                     "config.keep_checkpoints must be finite and > 0, got 0",
                     "config.optimizer.l2 must be >= 0, got nan",
                     "config.tgd.frozen_bn must be one of ('batch', 'running'), "
                     "got 'sometimes'"):
        assert expected in message
    assert message.count("config.") == 6


@pytest.mark.parametrize("field, value, rule", [
    ("optimizer.warmup_steps", 12, "must be a whole number >= 0 and below num_steps"),
    ("optimizer.warmup_steps", -1, "must be a whole number >= 0 and below num_steps"),
    ("data.target", "truth", "must be one of ('target', 'noiseless')"),
    ("optimizer.warmup_steps", 6, "must be below the cosine's decay steps"),
    ("data.target", "noiseless", "'noiseless' needs held-out studies"),
    ("data.hot_fraction", 1.5, "must be in [0, 1]"),
    ("data.hot_fraction", float("nan"), "must be in [0, 1]"),
])
def test_the_lever_fields_refuse_senseless_values(field, value, rule):
    c = config_lib.override(config_lib.train_config("tiny"), **{field: value})  # 12 steps
    if field == "optimizer.warmup_steps" and value == 6:
        c.optimizer.decay_fraction = 0.5  # the cosine decays over 6 steps: none left
    if field == "data.target":
        c.data.val_studies = 0
    with pytest.raises(ValueError, match=re.escape(f"config.{field} {rule}")):
        config_lib.validate(c)


@pytest.mark.parametrize("change", [{"tgd.reinit_scale": 1.0}, {"method": "packnet"}],
                         ids=["reinit", "packnet"])
def test_l2_sp_with_re_drawn_weights_is_refused(change):
    c = config_lib.finetune_config("tiny")
    c.checkpoint = "x"
    config_lib.override(c, **{"optimizer.l2_sp": 0.1, **change})
    with pytest.raises(ValueError, match="optimizer.l2_sp pulls toward the starting weights"):
        config_lib.validate(c)
    config_lib.override(c, **{"optimizer.l2_sp": 0.0})
    config_lib.validate(c)  # either alone is fine


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown config preset 'huge'"):
        config_lib.train_config("huge")


def test_a_bad_config_leaves_no_workdir(toy_data, tmp_path):
    with pytest.raises(ValueError, match="config.eval_every must be finite and > 0"):
        pipeline.train(tiny_train_config(toy_data["train"], eval_every=0), tmp_path / "run",
                       log=quiet)
    assert not (tmp_path / "run").exists()


def test_finetune_adopts_the_checkpoints_architecture_in_a_copy(toy_data, pretrained,
                                                                tmp_path):
    c = config_lib.override(config_lib.finetune_config("tiny"), **{
        "data.path": str(toy_data["finetune"]), "checkpoint": str(pretrained),
        "model.features": (16, 16, 3), "data.intensity_scale": 7.0, "num_steps": 2})
    before = c.to_dict()
    pipeline.finetune(c, tmp_path / "run", log=quiet)
    assert c.to_dict() == before  # the caller's config is not edited
    ran = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    source = json.loads((pretrained / "config.json").read_text())["config"]
    assert ran["model"] == source["model"]  # what actually ran is on disk
    assert ran["data"]["intensity_scale"] == source["data"]["intensity_scale"]


def test_kept_steps_past_the_runs_end_are_ignored_as_before():
    """A run whose length comes from num_epochs may end before some of keep_steps: the
    loop's cadence drops them (the generic Cadence refuses them when given directly)."""
    from tgd_jax.errors import UsageError
    from tgd_jax.pet import training
    from tgd_jax.train import trainer

    c = config_lib.override(config_lib.train_config("tiny"), keep_steps=(4, 100))
    assert training.cadence(c, 12).keep_steps == (4,)
    with pytest.raises(UsageError, match=r"keep_steps \[100\] lie outside 1..12"):
        trainer.Cadence(num_steps=12, eval_every=4, keep_steps=(4, 100))
