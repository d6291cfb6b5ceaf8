"""Whole-volume denoising: the 2.5D stacks and their mirrored edges."""

from __future__ import annotations

import numpy as np
import pytest

from tgd_jax.pet.denoise import slice_stacks


def test_each_slice_gets_its_neighbours_mirrored_at_the_ends():
    volume = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 2, 2), np.float32)
    stacks = slice_stacks(volume)
    assert stacks.shape == (4, 2, 2, 3)
    assert [tuple(s[0, 0]) for s in stacks] == [(1, 0, 1), (0, 1, 2), (1, 2, 3), (2, 3, 2)]


def test_a_single_slice_is_refused():
    with pytest.raises(ValueError, match=r"expected a \(Z >= 2, H, W\) volume"):
        slice_stacks(np.zeros((1, 4, 4)))
