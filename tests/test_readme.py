"""The code blocks of the README and of docs/own_model.md run as written."""

from __future__ import annotations

import functools
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
    "own-model-nnx-paper": (_blocks(ROOT / "docs" / "own_model.md"), 1, 2),
    "own-model-fit": (_blocks(ROOT / "docs" / "own_model.md"), 3),
}


def test_the_pages_have_their_blocks():
    assert len(BLOCKS["readme"][0]) == 1
    linen, nnx_block, nnx_paper, fit = _blocks(ROOT / "docs" / "own_model.md")
    assert "UNet" in linen and "nnx.Optimizer" in nnx_block and "trainer.fit" in fit
    assert 'mode="paper"' in nnx_paper and "tgd_jax.gated" in nnx_paper


@functools.cache
def _run(name: str) -> dict:
    """Runs a page's block (after the blocks it continues, if any) in one namespace, once:
    the tests below read what it left (a block takes 5-18 s)."""
    blocks, *indices = BLOCKS[name]
    namespace: dict = {}
    for index in indices:
        exec(compile(blocks[index], name, "exec"), namespace)
    return namespace


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_runs(name):
    namespace = _run(name)
    if "plan" in namespace and "value" in namespace:
        assert 0 < namespace["plan"].summary["retrained_fraction"] < 1
        assert np.isfinite(float(namespace["value"]))
    if "summary" in namespace:  # the runtime's loop ran to its end and validated
        assert namespace["summary"]["steps"] == 20
        assert np.isfinite(namespace["summary"]["final_val_loss"])


@pytest.mark.parametrize("name", ["readme", "own-model-linen-unet"])
def test_the_linen_blocks_leave_every_frozen_value_bit_identical(name):
    from tgd_jax.graph import flat_paths

    namespace = _run(name)
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


def test_the_nnx_paper_block_gates_every_frozen_element_and_keeps_it():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tgd_jax.graph import flat_paths

    ns = _run("own-model-nnx-paper")
    plan, start, x = ns["plan"], ns["start"], ns["x"]
    assert plan.summary["mode"] == "paper" and plan.auto_gates

    @jax.jit
    def grads(p, s):
        return jax.grad(lambda q: jnp.mean((ns["forward"](nnx.merge_state(q, s), x)[0]
                                            - 0.9 * x) ** 2))(p)

    masks = flat_paths(plan.mask, none_leaves=True)
    before, after = flat_paths(start), flat_paths(ns["params"])
    gated = flat_paths(grads(start, nnx.state(ns["model"], nnx.BatchStat)))
    # the output layer's gate stays open (closing it would stop every gradient); its
    # frozen filters are held by the optimizer's mask alone
    graph = plan.graph
    open_gate = {la.path for la in graph.layers if set(la.out_maps) & graph.outputs}
    frozen = moved = gated_frozen = 0
    for path, value in before.items():
        m = masks[path]
        m = np.zeros(np.shape(value), bool) if m is None else np.broadcast_to(
            np.asarray(m), np.shape(value))
        assert np.array_equal(np.asarray(value)[~m], np.asarray(after[path])[~m]), path
        if path.rpartition("/")[0] not in open_gate:  # the gates, not the mask
            assert not np.any(np.asarray(gated[path])[~m]), path
            gated_frozen += int((~m).sum())
        frozen += int((~m).sum())
        moved += int(np.sum(np.asarray(value)[m] != np.asarray(after[path])[m]))
    assert open_gate == {"out"} and gated_frozen > 0 and frozen > gated_frozen and moved > 0
