"""The options of a fine-tuning plan as one typed, validated value: :class:`TGDRule`.

Every option of the TGD rule and of how a run applies it lives here, once: the planning
functions (:func:`tgd_jax.tgd_plan`, :func:`tgd_jax.plan_finetune`) take a rule, the
commands' ``config.tgd`` section has exactly its fields (``TGDRule(**config.tgd)``), and a
bad value is refused when the rule is made, naming the field, before any KSE is computed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

from tgd_jax import masks as masks_lib
from tgd_jax.errors import UsageError

__all__ = ["TGDRule", "FIRST", "LAST"]

#: Policies of the maps written only by layers that read the model's input.
FIRST: tuple[str, ...] = ("kse", "frozen", "train")
#: Policies of the maps no layer reads (the last layer's).
LAST: tuple[str, ...] = ("frozen", "train")


@dataclasses.dataclass(frozen=True)
class TGDRule:
    """Which channels a plan retrains and how a training run treats them.

    Attributes:
      phi: KSE threshold in [0, 1]; maps scoring below it are retrained (the selectors
        ``tgd``, ``random``, ``l1``).
      alpha, k: KSE's entropy weight (``>= 0``) and nearest neighbours (``>= 1``):
        :func:`tgd_jax.kse.kse_scores`.
      first: maps written only by layers that read the model's input: one of
        :data:`FIRST` (``"kse"``: the rule decides).
      last: maps no layer reads (the last layer's): one of :data:`LAST` (the paper:
        ``"frozen"``).
      mode: ``"projected"`` (the optax mask alone) or ``"paper"`` (the backward pass gated
        as well): :data:`tgd_jax.masks.MODES`.
      combine: how a map read by several layers combines their scores
        (:data:`tgd_jax.masks.COMBINE`).
      other: parameters of no channel: ``"frozen"`` or ``"train"``.
      readers: also retrain the input slices of frozen filters that read retrained maps
        (:data:`tgd_jax.masks.READERS`); projected mode only.
      frozen_bn, retrained_bn: how frozen / retrained BatchNorm channels normalise in
        training passes (:data:`tgd_jax.masks.BN_MODES`; docs/method.md).
      packnet_fraction: the fraction of each kernel the ``packnet`` selector frees, in
        (0, 1).
      reinit_scale: ``> 0``: a run re-draws what is retrained (He-normal times this scale)
        before training; 0 keeps the pretrained values (the paper).
      gate_cosine: a run logs the cosine between the gated and the true gradient (one
        more backward pass a step; paper mode's diagnostic).

    Raises:
      UsageError: naming the field and the allowed values, when the rule is made.

    Example:
      >>> rule = TGDRule(phi=0.4, mode="paper")
      >>> rule.phi, rule.readers
      (0.4, 'none')
      >>> TGDRule(mode="paper", readers="all")
      Traceback (most recent call last):
      ...
      tgd_jax.errors.UsageError: TGDRule: readers='all' needs mode='projected': ...
    """

    phi: float = 0.3
    alpha: float = 1.0
    k: int = 5
    first: str = "kse"
    last: str = "frozen"
    mode: str = "projected"
    combine: str = "max"
    other: str = "frozen"
    readers: str = "none"
    frozen_bn: str = "running"
    retrained_bn: str = "batch"
    packnet_fraction: float = 0.5
    reinit_scale: float = 0.0
    gate_cosine: bool = False

    def __post_init__(self) -> None:
        for field in ("phi", "alpha", "packnet_fraction", "reinit_scale"):
            value = getattr(self, field)  # a 0-d array (jnp.float32(0.5)) as a Python float
            kind = getattr(getattr(value, "dtype", None), "kind", "")
            if (not isinstance(value, numbers.Real | bool) and getattr(value, "ndim", None) == 0
                    and kind and kind in "fiu"):
                object.__setattr__(self, field, float(value))
        problems = self.problems(dataclasses.asdict(self))
        if problems:
            raise UsageError("TGDRule: " + "; ".join(
                f"{field}={getattr(self, field)!r} {problem}" for field, problem in problems))

    @staticmethod
    def problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Every bad field of ``values`` (a rule's fields) as ``(field, problem)``, so that
        a config can name them all at once; ``[]`` if the rule is valid.

        Example:
          >>> TGDRule.problems({"phi": 1.5, "mode": "paper", "readers": "none"})
          [('phi', 'must be in [0, 1] (KSE is normalised)')]
        """
        out: list[tuple[str, str]] = []

        def need(field: str, ok: Any, problem: str) -> None:
            if field in values and not ok(values[field]):
                out.append((field, problem))

        def one_of(field: str, allowed: tuple[str, ...]) -> None:
            need(field, lambda v: v in allowed, f"must be one of {allowed}")

        def real(v: Any) -> bool:  # numpy scalars too; bools are not numbers here
            return isinstance(v, numbers.Real) and not isinstance(v, bool)

        need("phi", lambda v: real(v) and 0.0 <= v <= 1.0,
             "must be in [0, 1] (KSE is normalised)")
        need("alpha", lambda v: real(v) and 0.0 <= v < math.inf, "must be finite and >= 0")
        need("k", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
             and v >= 1,
             "must be an integer >= 1")
        one_of("first", FIRST)
        one_of("last", LAST)
        one_of("mode", masks_lib.MODES)
        one_of("combine", masks_lib.COMBINE)
        one_of("other", masks_lib.OTHER)
        one_of("readers", masks_lib.READERS)
        one_of("frozen_bn", masks_lib.BN_MODES)
        one_of("retrained_bn", masks_lib.BN_MODES)
        need("packnet_fraction", lambda v: real(v) and 0.0 < v < 1.0, "must be in (0, 1)")
        need("reinit_scale", lambda v: real(v) and 0.0 <= v < math.inf,
             "must be finite and >= 0")
        need("gate_cosine", lambda v: isinstance(v, bool), "must be True or False")
        if values.get("readers", "none") != "none" and values.get("mode") == "paper":
            out.append(("readers", "needs mode='projected': in paper mode the gates stop the "
                        "gradient of the frozen maps those input slices feed"))
        return out

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The rule's field names (what a ``config.tgd`` section holds)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TGDRule:
        """A rule from keyword options, naming any that is not a field.

        Example:
          >>> TGDRule.from_options({"phi": 0.5}).phi
          0.5
        """
        unknown = sorted(set(options) - set(cls.fields()))
        if unknown:
            raise UsageError(f"unknown TGD option(s) {unknown}; the rule's fields are "
                             f"{cls.fields()}")
        return cls(**options)
