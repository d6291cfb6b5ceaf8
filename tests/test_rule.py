"""The typed planning API: TGDRule validates every field once, the config section is the
rule, and methods are selectors in a registry a user can extend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tgd_jax
from tgd_jax import SELECTORS, Selector, TGDRule, plan_finetune, register_selector
from tgd_jax.errors import UsageError
from tgd_jax.pet import config as config_lib
from tgd_jax.topology import sequential_topology

BAD = {"phi": 1.5, "alpha": -1.0, "k": 0, "first": "all", "last": "kse", "mode": "gated",
       "combine": "sum", "other": "maybe", "readers": "some", "frozen_bn": "sometimes",
       "retrained_bn": "never", "packnet_fraction": 1.0, "reinit_scale": float("nan"),
       "gate_cosine": "yes"}


def _params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {"a": {"kernel": jax.random.normal(keys[0], (3, 3, 1, 8))},
            "b": {"kernel": jax.random.normal(keys[1], (3, 3, 8, 8))},
            "c": {"kernel": jax.random.normal(keys[2], (3, 3, 8, 1))}}


def test_every_field_has_a_bad_value_here():
    assert set(BAD) == set(TGDRule.fields())


@pytest.mark.parametrize("field", sorted(BAD))
def test_a_bad_field_is_refused_by_name(field):
    with pytest.raises(UsageError, match=f"TGDRule: {field}="):
        TGDRule(**{field: BAD[field]})


def test_every_bad_field_is_named_at_once_and_readers_need_projected():
    problems = TGDRule.problems({**BAD, "mode": "paper", "readers": "all"})
    named = {field for field, _ in problems}
    assert named == set(BAD) - {"mode", "readers"} | {"readers"}
    assert TGDRule.problems(dict(TGDRule().__dict__)) == []
    assert TGDRule(phi=np.float32(0.5), k=np.int64(3)).k == 3  # numpy scalars are numbers
    assert TGDRule(phi=jnp.float32(0.5)).phi == 0.5  # and 0-d arrays (a jnp.linspace sweep)
    with pytest.raises(UsageError, match="TGDRule: phi="):
        TGDRule(phi=jnp.ones(2))
    with pytest.raises(UsageError, match="readers='all' needs mode='projected'"):
        TGDRule(mode="paper", readers="all")


def test_the_config_section_is_the_rule():
    # one list of options: the commands' config.tgd has exactly the rule's fields
    section = config_lib.tgd_section(phi=0.3)
    assert set(section) == set(TGDRule.fields())
    assert TGDRule(**section) == TGDRule(phi=0.3)
    config = config_lib.finetune_config()
    config.tgd.treshold = 0.5
    with pytest.raises(UsageError, match=r"config.tgd.treshold is not a field of "):
        config_lib.validate(config)
    bad = config_lib.tgd_section(phi=0.3)
    bad.phi, bad.mode = 2.0, "gated"
    problems = TGDRule.problems(bad)
    assert [f for f, _ in problems] == ["phi", "mode"]


def test_rule_and_keywords_make_the_same_plan_and_cannot_be_mixed():
    params, topology = _params(), sequential_topology(["a", "b", "c"])
    by_rule = plan_finetune("tgd", params, topology, rule=TGDRule(phi=0.6, last="train"))
    by_keywords = tgd_jax.tgd_plan(params, topology, 0.6, last="train")
    for path in by_rule.channels:
        np.testing.assert_array_equal(by_rule.channels[path], by_keywords.channels[path])
    assert by_rule.summary == by_keywords.summary
    with pytest.raises(UsageError, match="either rule= or its fields"):
        plan_finetune("tgd", params, topology, rule=TGDRule(), phi=0.5)
    with pytest.raises(UsageError, match="phi inside rule="):
        tgd_jax.tgd_plan(params, topology, 0.5, rule=TGDRule())
    with pytest.raises(UsageError, match=r"unknown TGD option\(s\) \['treshold'\]"):
        plan_finetune("tgd", params, topology, treshold=0.5)
    with pytest.raises(UsageError, match="unknown fine-tuning method 'tdg'"):
        plan_finetune("tdg", params, topology)


def test_a_registered_selector_plans_like_a_built_in_one():
    params, topology = _params(), sequential_topology(["a", "b", "c"])

    def complement(sel):  # what TGD would keep, retrained; what it would retrain, kept
        return {path: ~jnp.asarray(m) for path, m in sel.choice.items()}

    register_selector("complement", Selector(complement, uses_kse=True,
                                             settings=("phi", "mode")))
    try:
        with pytest.raises(UsageError, match="exists; pass replace=True"):
            register_selector("complement", Selector(complement))
        with pytest.raises(UsageError, match="must be a tgd_jax.methods.Selector"):
            register_selector("bare", complement)
        tgd = plan_finetune("tgd", params, topology, phi=0.5)
        mine = plan_finetune("complement", params, topology, phi=0.5)
        for path in tgd.channels:
            np.testing.assert_array_equal(mine.channels[path], ~np.asarray(tgd.channels[path]))
        assert mine.summary["method"] == "complement" and mine.summary["phi"] == 0.5
        # the mask follows the channels: a retrained filter is trainable, a kept one not
        kernel = np.broadcast_to(mine.mask["b"]["kernel"], (3, 3, 8, 8))
        np.testing.assert_array_equal(kernel[0, 0, 0], np.asarray(mine.channels["b"]))
        # and the commands accept it by name
        config_lib.validate(config_lib.override(config_lib.finetune_config(),
                                                method="complement", checkpoint="runs/v1net"))
    finally:
        del SELECTORS["complement"]

