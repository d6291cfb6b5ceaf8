"""The README's code blocks for your own model run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks():
    section = README.read_text().split("## Using TGD on your own Flax model")[1]
    section = section.split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_a_linen_and_an_nnx_block():
    blocks = _blocks()
    assert len(blocks) == 2 and "UNet" in blocks[0] and "nnx.Optimizer" in blocks[1]


@pytest.mark.parametrize("index", [0, 1], ids=["linen-unet", "nnx"])
def test_readme_block_runs(index):
    namespace: dict = {}
    exec(compile(_blocks()[index], f"README block {index}", "exec"), namespace)
    if index == 0:
        assert 0 < namespace["plan"].summary["retrained_fraction"] < 1
        assert float(namespace["value"]) > 0
