"""The TGD layer: identity forward, per-channel masked cotangent backward.

The paper inserts this layer after every conv and every BatchNorm. In the backward pass it
multiplies ``dL/dY_n`` by ``M_n``, so a frozen channel's filter, bias and BN affine get
exactly zero gradient, AND no gradient flows through frozen channels into earlier layers.
The latter is what distinguishes the paper's TGD (``mode="paper"``) from masking the
parameter updates only (``mode="projected"``, the optax mask alone).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from tgd_jax.errors import UsageError

__all__ = ["GATE_COLLECTION", "tgd_gate", "apply_mask", "TGDGate"]

#: Flax variable collection holding the gate masks (not trainable, not in ``params``).
GATE_COLLECTION = "tgd"


@jax.custom_jvp
def tgd_gate(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Identity on ``x`` whose derivative is ``diag(mask)``.

    Args:
      x: ``(..., C)`` activations, channels last.
      mask: broadcastable to ``x``, usually ``(C,)``. Bool: True = let the derivative
        through (retrain), False = block it (frozen channel); blocked elements get exactly
        0, even where the incoming cotangent is inf or NaN. Float: the derivative is
        multiplied by it (a mask of 0.5 halves the cotangent).

    Returns:
      ``x`` unchanged. The mask gets no derivative. Reverse mode multiplies the cotangent
      by the mask (the paper's TGD layer); forward mode (``jax.jvp``) multiplies the
      tangent by it, the same linear map, so both modes and their compositions agree.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> mask = jnp.array([True, False])
      >>> tgd_gate(jnp.array([3.0, 4.0]), mask).tolist()  # identity forward
      [3.0, 4.0]
      >>> jax.grad(lambda x: tgd_gate(x, mask).sum())(jnp.ones(2)).tolist()  # masked backward
      [1.0, 0.0]
      >>> jax.grad(lambda x: tgd_gate(x, jnp.array([0.5, 2.0])).sum())(jnp.ones(2)).tolist()
      [0.5, 2.0]
    """
    del mask
    return x


@tgd_gate.defjvp
def _gate_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, Any]
              ) -> tuple[jax.Array, jax.Array]:
    x, mask = primals
    return x, apply_mask(mask, tangents[0])


def apply_mask(mask: jax.Array, t: jax.Array) -> jax.Array:
    """``where(mask, t, 0)`` for a bool mask (exact zeros), ``t * mask`` for a float one.

    Linear in ``t``, so JAX transposes it for the reverse pass.

    Example:
      >>> import jax.numpy as jnp
      >>> apply_mask(jnp.array([True, False]), jnp.array([jnp.nan, jnp.nan])).tolist()
      [nan, 0.0]
    """
    mask = jnp.asarray(mask)
    if mask.dtype == jnp.bool_:
        return jnp.where(mask, t, jnp.zeros_like(t))
    return t * mask.astype(t.dtype)


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
            raise UsageError(
                f"gate '{self.name}': mask shape {mask.shape} does not match "
                f"{x.shape[-1]} channels"
            )
        return tgd_gate(x, mask)
