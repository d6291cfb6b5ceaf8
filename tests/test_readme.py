"""The code blocks of the README and of docs/own_model.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _blocks(path: Path, after: str = "") -> list[str]:
    text = path.read_text()
    if after:
        text = text.split(after)[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


BLOCKS = {
    "readme": (_blocks(ROOT / "README.md", "## TGD on your own model"), 0),
    "own-model-linen-unet": (_blocks(ROOT / "docs" / "own_model.md"), 0),
    "own-model-nnx": (_blocks(ROOT / "docs" / "own_model.md"), 1),
}


def test_the_pages_have_their_blocks():
    assert len(BLOCKS["readme"][0]) == 1
    linen, nnx_block = _blocks(ROOT / "docs" / "own_model.md")
    assert "UNet" in linen and "nnx.Optimizer" in nnx_block


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_runs(name):
    blocks, index = BLOCKS[name]
    namespace: dict = {}
    exec(compile(blocks[index], name, "exec"), namespace)
    if "plan" in namespace and "value" in namespace:
        assert 0 < namespace["plan"].summary["retrained_fraction"] < 1
        assert np.isfinite(float(namespace["value"]))


@pytest.mark.parametrize("name", ["readme", "own-model-linen-unet"])
def test_the_linen_blocks_leave_every_frozen_value_bit_identical(name):
    from tgd_jax.graph import flat_paths

    blocks, index = BLOCKS[name]
    namespace: dict = {}
    exec(compile(blocks[index], name, "exec"), namespace)
    before, plan = namespace["variables"], namespace["plan"]
    for collection, after, mask in (("params", namespace["params"], plan.mask),
                                    ("batch_stats", namespace["stats"], plan.stats_mask)):
        old, new = flat_paths(before[collection]), flat_paths(after)
        masks = flat_paths(mask, none_leaves=True)
        moved = 0
        for path, value in new.items():
            m = masks.get(path)
            m = np.zeros(np.shape(value), bool) if m is None else np.broadcast_to(
                np.asarray(m), np.shape(value))
            assert np.array_equal(np.asarray(old[path])[~m], np.asarray(value)[~m]), path
            moved += int(np.sum(np.asarray(old[path])[m] != np.asarray(value)[m]))
        assert moved > 0, collection  # the retrained part did move
