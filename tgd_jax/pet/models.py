"""The denoisers: the paper's 2.5D DnCNN (Zhang et al. 2017, as used by Chen et al. 2021),
a 2.5D UNet and a residual network, selected by ``config.model.name``.

The DnCNN:

Input: ``(B, H, W, 3)``, three consecutive axial slices as channels (NHWC).
Layers: conv1 -> ReLU; conv2..conv{L-1} -> BatchNorm -> ReLU; conv{L} linear, all 3x3.
The convs followed by BatchNorm have no bias, as in the original DnCNN: BatchNorm subtracts
the per-channel mean, so such a bias has an exactly-zero gradient (only rounding noise,
which Adam would amplify into a random walk) and no effect on the output.
Residual learning: conv{L} predicts the noise of the 3 slices; output = input - noise.
With ``use_gates`` a :class:`~tgd_jax.gate.TGDGate` follows every conv and BatchNorm except
the last conv (conv -> gate -> BN -> gate -> ReLU), named ``gate_conv{i}`` / ``gate_bn{i}``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from tgd_jax.errors import UsageError
from tgd_jax.gate import TGDGate
from tgd_jax.graph import ChannelGraph
from tgd_jax.topology import Topology, dncnn_topology
from tgd_jax.trace import trace_topology

__all__ = ["PAPER_FEATURES", "DnCNN", "UNet", "ResNetDenoiser", "MODELS", "scaled_features",
           "model_from_config", "network_of", "model_graph"]

#: Output channels of conv1..conv8 in the paper.
PAPER_FEATURES: tuple[int, ...] = (64, 64, 128, 128, 128, 256, 256, 3)


def scaled_features(features: Sequence[int], multiplier: float) -> tuple[int, ...]:
    """Scales every width but the last (which must equal the input channels), min 1."""
    if multiplier <= 0:
        raise UsageError(f"width multiplier must be > 0, got {multiplier}")
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
            raise UsageError(f"DnCNN needs at least 2 layers, got features={widths}")
        if x.ndim != 4 or x.shape[-1] != widths[-1]:
            raise UsageError(
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
                h = bn(h, use_running_average=not train)
                if self.use_gates:
                    h = TGDGate(name=f"gate_bn{i}")(h)
            h = nn.relu(h)
        return (x - h).astype(x.dtype)


def _scaled(width: int, multiplier: float) -> int:
    if multiplier <= 0:
        raise UsageError(f"width multiplier must be > 0, got {multiplier}")
    return max(1, round(width * multiplier))


def _conv_bn_relu(h: jax.Array, width: int, name: str, *, train: bool, momentum: float,
                  dtype: Any) -> jax.Array:
    """3x3 conv (no bias: the BatchNorm after it would cancel one) -> BatchNorm -> ReLU."""
    h = nn.Conv(width, (3, 3), padding="SAME", use_bias=False, dtype=dtype,
                name=f"{name}_conv")(h)
    h = nn.BatchNorm(momentum=momentum, dtype=dtype, name=f"{name}_bn")(
        h, use_running_average=not train)
    return nn.relu(h)


class UNet(nn.Module):
    """2.5D UNet denoiser: the encoder-decoder with concatenated skips used for PET today.

    Input ``(B, H, W, 3)`` (three consecutive slices, H and W divisible by
    ``2 ** (len(features) - 1)``); each level has two conv -> BatchNorm -> ReLU blocks;
    2 x 2 max pooling down, a 2 x 2 stride-2 transposed conv up, the encoder's maps
    concatenated to the decoder's at each level; a 1 x 1 conv predicts the noise of the
    three slices, and the output is the input minus it (residual, as the DnCNN).

    Attributes:
      features: widths per level; the last is the bottleneck's.
      width_multiplier: scales every width (min 1).
      bn_momentum: BatchNorm running-average momentum.
      dtype: computation dtype (params stay float32).
    """

    features: Sequence[int] = (64, 128, 256)
    width_multiplier: float = 1.0
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """``(B, H, W, C) -> (B, H, W, C)`` denoised slices; ``train`` selects BN batch stats."""
        widths = [_scaled(f, self.width_multiplier) for f in self.features]
        down = 2 ** (len(widths) - 1)
        if x.ndim != 4 or x.shape[1] % down or x.shape[2] % down:
            raise UsageError(f"UNet with {len(widths)} levels expects (batch, H, W, C) inputs "
                             f"with H and W divisible by {down}, got {x.shape}")
        block = functools.partial(_conv_bn_relu, train=train, momentum=self.bn_momentum,
                                  dtype=self.dtype)
        h, skips = x.astype(self.dtype), []
        for level, width in enumerate(widths[:-1]):
            h = block(block(h, width, f"enc{level}a"), width, f"enc{level}b")
            skips.append(h)
            h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = block(block(h, widths[-1], "mid_a"), widths[-1], "mid_b")
        for level in reversed(range(len(widths) - 1)):
            h = nn.ConvTranspose(widths[level], (2, 2), strides=(2, 2), dtype=self.dtype,
                                 name=f"up{level}")(h)
            h = jnp.concatenate([h, skips[level]], axis=-1)
            h = block(block(h, widths[level], f"dec{level}a"), widths[level], f"dec{level}b")
        noise = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name="out")(h)
        return (x - noise).astype(x.dtype)


class ResNetDenoiser(nn.Module):
    """A residual denoiser: a stem conv, residual blocks (conv -> BN -> ReLU -> conv -> BN,
    added to the stream, ReLU), a conv predicting the noise; output = input - noise.

    The adds tie the channels of the stem and of every block's second conv: TGD makes one
    decision per stream channel for all of them.

    Attributes:
      width: stream width.
      blocks: residual blocks.
      width_multiplier, bn_momentum, dtype: as :class:`UNet`.
    """

    width: int = 64
    blocks: int = 4
    width_multiplier: float = 1.0
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """``(B, H, W, C) -> (B, H, W, C)`` denoised slices; ``train`` selects BN batch stats."""
        if x.ndim != 4:
            raise UsageError(f"ResNetDenoiser expects (batch, H, W, C) inputs, got {x.shape}")
        width = _scaled(self.width, self.width_multiplier)
        norm = functools.partial(nn.BatchNorm, momentum=self.bn_momentum, dtype=self.dtype)
        h = nn.relu(nn.Conv(width, (3, 3), dtype=self.dtype, name="stem")(x.astype(self.dtype)))
        for b in range(self.blocks):
            r = _conv_bn_relu(h, width, f"block{b}_0", train=train, momentum=self.bn_momentum,
                              dtype=self.dtype)
            r = nn.Conv(width, (3, 3), use_bias=False, dtype=self.dtype,
                        name=f"block{b}_1_conv")(r)
            r = norm(name=f"block{b}_1_bn")(r, use_running_average=not train)
            h = nn.relu(h + r)
        noise = nn.Conv(x.shape[-1], (3, 3), dtype=self.dtype, name="out")(h)
        return (x - noise).astype(x.dtype)


#: The denoisers ``config.model.name`` selects.
MODELS: tuple[str, ...] = ("dncnn", "unet", "resnet")


def model_from_config(model_config: Mapping[str, Any]) -> nn.Module:
    """The denoiser a config's ``model`` section describes (``name``: one of :data:`MODELS`).

    A section without ``name`` (a checkpoint written before there were several) is a DnCNN.
    """
    name = model_config.get("name", "dncnn")
    common = {"width_multiplier": float(model_config["width_multiplier"]),
              "bn_momentum": float(model_config["bn_momentum"])}
    if name == "dncnn":
        return DnCNN(features=tuple(model_config["features"]), **common)
    if name == "unet":
        return UNet(features=tuple(model_config["unet_features"]), **common)
    if name == "resnet":
        return ResNetDenoiser(width=int(model_config["resnet_width"]),
                              blocks=int(model_config["resnet_blocks"]), **common)
    raise UsageError(f"config.model.name must be one of {MODELS}, got {name!r}")


def network_of(config: Mapping[str, Any], where: str) -> tuple[nn.Module, float]:
    """The denoiser and intensity scale that a checkpoint's stored config describes.

    Raises:
      CheckpointError: naming the checkpoint ``where``, if the config lacks them or holds
        values of the wrong type.
    """
    from tgd_jax.io.errors import one_line
    from tgd_jax.train.checkpoints import CheckpointError

    try:
        return model_from_config(config["model"]), float(config["data"]["intensity_scale"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: its stored config does not describe a network "
                              f"({type(e).__name__}: {one_line(e)})") from None


def model_graph(model: nn.Module, variables: Mapping[str, Any], patch_size: int
                ) -> ChannelGraph:
    """The model's channel graph, traced from its inference call on one patch."""
    x = jnp.zeros((1, patch_size, patch_size, 3), jnp.float32)
    return trace_topology(model.apply, variables, x, train=False)
