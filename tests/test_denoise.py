"""Whole-volume denoising: the 2.5D stacks, their mirrored edges, and a known residual."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tgd_jax.pet.denoise import denoise_volume, slice_stacks
from tgd_jax.pet.models import DnCNN


def test_each_slice_gets_its_neighbours_mirrored_at_the_ends():
    volume = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 2, 2), np.float32)
    stacks = slice_stacks(volume)
    assert stacks.shape == (4, 2, 2, 3)
    assert [tuple(s[0, 0]) for s in stacks] == [(1, 0, 1), (0, 1, 2), (1, 2, 3), (2, 3, 2)]


def test_a_single_slice_is_refused():
    with pytest.raises(ValueError, match=r"expected a \(Z >= 2, H, W\) volume"):
        slice_stacks(np.zeros((1, 4, 4)))


@pytest.mark.parametrize("scale", [1.0, 0.5, 4.0, 3.0])
@pytest.mark.parametrize("depth, batch_slices", [(11, 4), (5, 8), (8, 8)])
def test_a_network_with_a_known_residual_returns_the_known_image(scale, depth, batch_slices):
    # Truth without a reference implementation: the DnCNN outputs input - conv_L(...). With
    # conv_L's kernel zeroed and its bias (c0, c1, c2), every slice z must come back as
    # volume[z] - c1 / scale (the centre slice of its stack; the scale undone), whatever
    # the chunking, including a zero-padded last chunk.
    model = DnCNN(features=(4, 4, 3))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    params = dict(variables["params"])
    bias = jnp.array([0.25, -0.5, 2.0])
    params["conv3"] = {"kernel": jnp.zeros_like(params["conv3"]["kernel"]), "bias": bias}
    volume = np.random.default_rng(0).gamma(2.0, 1.0, (depth, 8, 8)).astype(np.float32)
    out = denoise_volume(model, {**variables, "params": params}, volume, scale=scale,
                         batch_slices=batch_slices)
    assert out.shape == volume.shape and out.dtype == np.float32
    expected = volume - np.float32(-0.5) / np.float32(scale)
    if scale in (1.0, 0.5, 4.0):  # powers of two: scaling is exact in float32
        np.testing.assert_array_equal(out, expected)
    else:
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
