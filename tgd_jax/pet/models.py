"""The paper's 2.5D DnCNN denoiser (Zhang et al. 2017, as used by Chen et al. 2021).

Input: ``(B, H, W, 3)``, three consecutive axial slices as channels (NHWC).
Layers: conv1 -> ReLU; conv2..conv{L-1} -> BatchNorm -> ReLU; conv{L} linear, all 3x3.
The convs followed by BatchNorm have no bias, as in the original DnCNN: BatchNorm subtracts
the per-channel mean, so such a bias has an exactly-zero gradient (only rounding noise,
which Adam would amplify into a random walk) and no effect on the output.
Residual learning: conv{L} predicts the noise of the 3 slices; output = input - noise.
In training mode, a :data:`~tgd_jax.masks.FROZEN_BN_COLLECTION` with ``(C,)`` bool entries
(:func:`~tgd_jax.masks.frozen_bn_variables`) makes those channels of ``bn{i}`` normalise
with their running statistics instead of the batch's (TGD's ``frozen_bn="running"``).
With ``use_gates`` a :class:`~tgd_jax.gate.TGDGate` follows every conv and BatchNorm except
the last conv (conv -> gate -> BN -> gate -> ReLU), named ``gate_conv{i}`` / ``gate_bn{i}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from tgd_jax.gate import TGDGate
from tgd_jax.masks import FROZEN_BN_COLLECTION, frozen_bn_flag
from tgd_jax.topology import Topology, dncnn_topology

__all__ = ["PAPER_FEATURES", "DnCNN", "scaled_features", "model_from_config"]

#: Output channels of conv1..conv8 in the paper.
PAPER_FEATURES: tuple[int, ...] = (64, 64, 128, 128, 128, 256, 256, 3)


def scaled_features(features: Sequence[int], multiplier: float) -> tuple[int, ...]:
    """Scales every width but the last (which must equal the input channels), min 1."""
    if multiplier <= 0:
        raise ValueError(f"width multiplier must be > 0, got {multiplier}")
    *hidden, last = features
    return tuple(max(1, round(f * multiplier)) for f in hidden) + (last,)


class DnCNN(nn.Module):
    """2.5D residual DnCNN.

    Attributes:
      features: output channels of each conv, last = input channels (3 slices).
      width_multiplier: scales the hidden widths (e.g. 0.25 for CPU-sized runs).
      kernel_size: spatial kernel size of every conv.
      use_gates: insert TGD gates (needed for ``mode="paper"``).
      bn_momentum: BatchNorm running-average momentum (Keras/flax convention).
      dtype: computation dtype (params stay float32).
    """

    features: Sequence[int] = PAPER_FEATURES
    width_multiplier: float = 1.0
    kernel_size: int = 3
    use_gates: bool = False
    bn_momentum: float = 0.9
    dtype: jnp.dtype = jnp.float32

    @property
    def widths(self) -> tuple[int, ...]:
        return scaled_features(self.features, self.width_multiplier)

    def topology(self) -> Topology:
        """The :class:`~tgd_jax.topology.ConvNode` wiring of this network, for TGD (it
        names the gates only when the network has them, ``use_gates=True``)."""
        return dncnn_topology(len(self.features), gates=self.use_gates)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """``(B, H, W, C) -> (B, H, W, C)`` denoised slices; ``train`` selects BN batch stats."""
        widths = self.widths
        if len(widths) < 2:
            raise ValueError(f"DnCNN needs at least 2 layers, got features={widths}")
        if x.ndim != 4 or x.shape[-1] != widths[-1]:
            raise ValueError(
                f"DnCNN expects (batch, height, width, {widths[-1]}) inputs, got {x.shape}"
            )
        depth = len(widths)
        h = x.astype(self.dtype)
        for i, width in enumerate(widths, start=1):
            h = nn.Conv(
                width,
                (self.kernel_size, self.kernel_size),
                padding="SAME",
                use_bias=i in (1, depth),  # BatchNorm follows the others: a bias is dead there
                dtype=self.dtype,
                name=f"conv{i}",
            )(h)
            if i == depth:
                break  # the "noise classifier" layer: linear, no gate
            if self.use_gates:
                h = TGDGate(name=f"gate_conv{i}")(h)
            if i > 1:
                bn = nn.BatchNorm(momentum=self.bn_momentum, dtype=self.dtype, name=f"bn{i}")
                flag = frozen_bn_flag(f"bn{i}")
                if train and self.has_variable(FROZEN_BN_COLLECTION, flag):
                    # TGD option: frozen channels normalise with their running statistics
                    # (as at inference) while retrained ones use the batch's. Running first:
                    # the batch-statistics call then updates the running averages.
                    running = bn(h, use_running_average=True)
                    h = jnp.where(self.get_variable(FROZEN_BN_COLLECTION, flag), running,
                                  bn(h, use_running_average=False))
                else:
                    h = bn(h, use_running_average=not train)
                if self.use_gates:
                    h = TGDGate(name=f"gate_bn{i}")(h)
            h = nn.relu(h)
        return (x - h).astype(x.dtype)


def model_from_config(model_config: Mapping[str, Any], *, use_gates: bool = False) -> DnCNN:
    """The :class:`~tgd_jax.pet.models.DnCNN` a config's ``model`` section describes."""
    return DnCNN(features=tuple(model_config["features"]),
                 width_multiplier=float(model_config["width_multiplier"]),
                 bn_momentum=float(model_config["bn_momentum"]), use_gates=use_gates)
