"""tgd-jax: Targeted Gradient Descent for Flax ConvNets.

The functional core, one module each:

* :mod:`tgd_jax.kse` - KSE scores of a conv kernel (pure, jit-able).
* :mod:`tgd_jax.topology` - which params make which feature map (:class:`ConvNode`).
* :mod:`tgd_jax.masks` - from params to channel masks and mask pytrees; summaries.
* :mod:`tgd_jax.optim` - the mask as an optax ``GradientTransformation``.
* :mod:`tgd_jax.gate` - the backward-only TGD layer (``jax.custom_vjp``).
* :mod:`tgd_jax.pet.models` - the paper's 2.5D DnCNN.
"""

from tgd_jax.gate import GATE_COLLECTION, TGDGate, tgd_gate
from tgd_jax.kse import kse_scores
from tgd_jax.masks import (
    TGDMasks,
    drop_kernels,
    freeze_batch_stats,
    gate_variables,
    mask_summary,
    tgd_masks,
)
from tgd_jax.optim import freeze_masked, replace_mask, tgd
from tgd_jax.topology import ConvNode, dncnn_topology, sequential_topology

__version__ = "0.1.0"

__all__ = [
    "GATE_COLLECTION",
    "ConvNode",
    "TGDGate",
    "TGDMasks",
    "dncnn_topology",
    "drop_kernels",
    "freeze_batch_stats",
    "freeze_masked",
    "gate_variables",
    "kse_scores",
    "mask_summary",
    "replace_mask",
    "sequential_topology",
    "tgd",
    "tgd_gate",
    "tgd_masks",
]
