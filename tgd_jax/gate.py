"""The TGD layer: identity forward, per-channel masked cotangent backward.

The paper inserts this layer after every conv and every BatchNorm. In the backward pass it
multiplies ``dL/dY_n`` by ``M_n``, so a frozen channel's filter, bias and BN affine get
exactly zero gradient, AND no gradient flows through frozen channels into earlier layers.
The latter is what distinguishes the paper's TGD (``mode="paper"``) from masking the
parameter updates only (``mode="projected"``, the optax mask alone).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

__all__ = ["GATE_COLLECTION", "tgd_gate", "TGDGate"]

#: Flax variable collection holding the gate masks (not trainable, not in ``params``).
GATE_COLLECTION = "tgd"


@jax.custom_vjp
def tgd_gate(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Identity on ``x`` whose cotangent is multiplied by ``mask``.

    Args:
      x: ``(..., C)`` activations, channels last.
      mask: ``(C,)`` bool or float (anything broadcastable to ``x``); True/1 = let the
        gradient through (retrain), False/0 = block it (frozen channel).

    Returns:
      ``x`` unchanged. The mask gets no gradient.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> mask = jnp.array([True, False])
      >>> tgd_gate(jnp.array([3.0, 4.0]), mask).tolist()  # identity forward
      [3.0, 4.0]
      >>> jax.grad(lambda x: tgd_gate(x, mask).sum())(jnp.ones(2)).tolist()  # masked backward
      [1.0, 0.0]
    """
    del mask
    return x


def _gate_fwd(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x, mask


def _gate_bwd(mask: jax.Array, g: jax.Array) -> tuple[jax.Array, None]:
    # where (not a product): a frozen channel's cotangent is exactly 0 even if g is inf/NaN.
    return jnp.where(jnp.asarray(mask, bool), g, jnp.zeros_like(g)), None


tgd_gate.defvjp(_gate_fwd, _gate_bwd)


class TGDGate(nn.Module):
    """Flax module form of :func:`tgd_gate`.

    The mask is the variable ``mask`` of shape ``(C,)`` in the :data:`GATE_COLLECTION`
    (``"tgd"``) collection; ``init`` creates it all True (gradient passes). If the
    collection is not passed to ``apply`` the gate is a plain identity, so models with
    gates evaluate and train normally without TGD.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> gate, x = TGDGate(), jnp.ones((1, 2))
      >>> variables = {"tgd": {"mask": jnp.array([False, True])}}
      >>> jax.grad(lambda x: gate.apply(variables, x).sum())(x).tolist()
      [[0.0, 1.0]]
      >>> jax.grad(lambda x: gate.apply({}, x).sum())(x).tolist()  # no collection: identity
      [[1.0, 1.0]]
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not (self.is_initializing() or self.has_variable(GATE_COLLECTION, "mask")):
            return x
        mask = self.variable(
            GATE_COLLECTION, "mask", lambda: jnp.ones((x.shape[-1],), bool)
        ).value
        if mask.shape != (x.shape[-1],):
            raise ValueError(
                f"gate '{self.name}': mask shape {mask.shape} does not match "
                f"{x.shape[-1]} channels"
            )
        return tgd_gate(x, mask)
