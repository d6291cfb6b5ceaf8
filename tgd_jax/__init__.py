"""tgd-jax: Targeted Gradient Descent for Flax ConvNets.

The package has three layers, and imports only point downwards:

* the **TGD core**, flat in ``tgd_jax`` (this namespace; any Flax ConvNet, no I/O):

  * :mod:`tgd_jax.kse` - KSE scores of a conv kernel (pure, jit-able).
  * :mod:`tgd_jax.graph` - the channel graph TGD decides on (:class:`ChannelGraph`).
  * :mod:`tgd_jax.trace` - the channel graph of any JAX function, read off its jaxpr.
  * :mod:`tgd_jax.topology` - hand-written sequential wiring (:class:`ConvNode`).
  * :mod:`tgd_jax.masks` - from params to channel masks, mask pytrees and collections.
  * :mod:`tgd_jax.methods` - one decision, one value: :class:`TGDPlan` (TGD and baselines).
  * :mod:`tgd_jax.optim` - the mask as an optax ``GradientTransformation``; optimizers.
  * :mod:`tgd_jax.gate` - the backward-only TGD layer (``jax.custom_jvp``).
  * :mod:`tgd_jax.autogate` - the paper's gates without model edits.
  * :mod:`tgd_jax.threshold` - the paper's threshold study, for any network.

* what every command shares, :mod:`tgd_jax.io` (workdir files, checked readers, the
  command-line error contract);
* the **training runtime**, :mod:`tgd_jax.train` (steps, the loop, checkpoints; any
  model, any data);
* the **PET application**, :mod:`tgd_jax.pet` (DnCNN, experiments, evaluation) and the
  simulator :mod:`tgd_jax.sim`.

``docs/method.md`` explains the method and what the paper leaves open.
"""

from tgd_jax.autogate import gated, training_apply
from tgd_jax.gate import GATE_COLLECTION, TGDGate, tgd_gate
from tgd_jax.graph import ChannelGraph, Layer
from tgd_jax.kse import kse_scores
from tgd_jax.masks import (
    drop_kernels,
    gate_variables,
    keep_frozen,
    layer_scores,
    mask_summary,
)
from tgd_jax.methods import (
    METHODS,
    SELECTORS,
    Selection,
    Selector,
    TGDPlan,
    plan_finetune,
    register_selector,
    tgd_plan,
)
from tgd_jax.optim import make_optimizer, replace_mask, retrain_only, tgd
from tgd_jax.rule import TGDRule
from tgd_jax.topology import ConvNode, dncnn_topology, sequential_topology, validate_topology
from tgd_jax.trace import TraceError, register_rule, trace_topology

__version__ = "0.1.0"

__all__ = [
    "GATE_COLLECTION",
    "METHODS",
    "SELECTORS",
    "Selection",
    "Selector",
    "ChannelGraph",
    "ConvNode",
    "Layer",
    "TGDGate",
    "TGDPlan",
    "TGDRule",
    "TraceError",
    "dncnn_topology",
    "drop_kernels",
    "gate_variables",
    "gated",
    "keep_frozen",
    "kse_scores",
    "layer_scores",
    "make_optimizer",
    "mask_summary",
    "plan_finetune",
    "replace_mask",
    "retrain_only",
    "sequential_topology",
    "tgd",
    "tgd_gate",
    "tgd_plan",
    "trace_topology",
    "register_rule",
    "register_selector",
    "training_apply",
    "validate_topology",
]
