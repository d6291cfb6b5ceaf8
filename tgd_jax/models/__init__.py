"""Network architectures."""

from tgd_jax.models.dncnn import PAPER_FEATURES, DnCNN, scaled_features

__all__ = ["PAPER_FEATURES", "DnCNN", "scaled_features"]
